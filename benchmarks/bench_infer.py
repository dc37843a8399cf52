"""Inference speed: prefill, decode with and without the KV cache, and infer.py's time to first token.

One run, one model (the reference config: d_model 256, 4 layers, 8 heads, 4 KV heads, GPT-2
vocabulary, random weights - speed does not depend on what the weights say):

  prefill      tokens/s of one forward over the prompt, filling the KV cache
  decode       new tokens/s, greedy, prompt then N new tokens, through infer.generate
               (KV cache: one token per step) and through a loop that recomputes the whole
               sequence every step (no cache); both include the first step after the prompt and
               both run the output head on the last position only (model(..., last_only=True)),
               so the ratio measures what the cache saves
  sampling     milliseconds per token spent in process_logits with infer.py's default filters
  first token  wall time from starting `python infer.py` to the first generated character on
               stdout, on the smoke checkpoint (trained here if missing)
  vs HF        (--vs-transformers) greedy decode tokens/s, batch 1, of infer.generate and of
               transformers' generate on the same weights, exported with `convert.py to-hf`

Examples (from the repository root; run under the CPU lock when recording numbers):

    flock /tmp/cpu.lock python benchmarks/bench_infer.py
    python benchmarks/bench_infer.py --prompt-tokens 128 --new-tokens 64 --repeats 1   # quick look
    python benchmarks/bench_infer.py --smoke-ckpt checkpoints/final.ckpt               # an existing checkpoint
    python benchmarks/bench_infer.py --skip-first-token --threads 1
    flock /tmp/cpu.lock python benchmarks/bench_infer.py --vs-transformers --skip-first-token
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import infer  # noqa: E402
from bench_model import timed  # noqa: E402  (this folder is on sys.path when the script runs)
from model import ModelConfig, Transformer  # noqa: E402

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
          "no_repeat_ngram_size": 0}
VOCAB = 50257  # GPT-2's tokenizer (the model pads its embedding to 50304 rows)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one untimed warm-up call."""
    return statistics.median(timed(fn, repeats, warmup=1))


def reference_model(prompt_tokens: int, new_tokens: int) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=704,
                         max_seq_len=prompt_tokens + new_tokens)
    return Transformer(config).eval()


def bench_prefill(model, prompt, repeats: int) -> dict:
    def prefill():
        with torch.inference_mode():
            model(prompt, infer.KVCache(model.config, 1), last_only=True)  # as infer.generate does

    return {"prefill tokens/s": prompt.shape[1] / median_seconds(prefill, repeats)}


def bench_decode(model, prompt, new_tokens: int, repeats: int) -> dict:
    head = infer.decode_head(model)  # once, as infer.py and explore.py do

    def with_cache():
        steps = infer.generate(model, prompt[0].tolist(), new_tokens, GREEDY, [torch.Generator()], head=head)
        return torch.stack([tokens for tokens, _ in steps])

    def without_cache():
        ids = prompt
        for _ in range(new_tokens):
            with torch.inference_mode():  # every step recomputes every position's keys and values
                logits = model(ids, last_only=True, decode=head)[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return ids[0, prompt.shape[1]:]

    assert with_cache()[:, 0].tolist() == without_cache().tolist(), "cached and uncached greedy tokens differ"
    cached = new_tokens / median_seconds(with_cache, repeats)
    uncached = new_tokens / median_seconds(without_cache, repeats)
    return {"decode tokens/s, KV cache": cached, "decode tokens/s, no cache": uncached,
            "KV cache speed-up": cached / uncached}


def bench_sampling(repeats: int) -> dict:
    """process_logits with infer.py's default filters (temperature 0.8, top-k 50, top-p 0.95)."""
    logits, ids = torch.randn(1, VOCAB), torch.randint(0, VOCAB, (1, 256))
    defaults = infer.sampling_settings(infer.parse_args(["--prompt", ""]))

    def hundred_calls():
        for _ in range(100):
            infer.process_logits(logits, ids, **defaults)

    return {"sampling ms/token (default filters)": median_seconds(hundred_calls, repeats) * 10}


def bench_hf_generate(model, prompt, new_tokens: int, repeats: int) -> dict:
    """Greedy decode, batch 1: infer.generate vs transformers' generate on the same weights.

    The model goes through `convert.py to-hf` and comes back through AutoModelForCausalLM, as a
    user of the export would load it (default attention, its own KV cache). Both produce exactly
    new_tokens tokens (min_new_tokens keeps generate from stopping at a random end-of-text).
    """
    import tempfile

    import transformers

    import convert
    from checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_hf_") as folder:
        ckpt, out = os.path.join(folder, "ours.ckpt"), os.path.join(folder, "hf")
        meta = {"kind": "pretrain", "step": 0, "model_config": vars(model.config).copy(), "tokenizer": "gpt2"}
        save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, ckpt)
        convert.main(["to-hf", "--ckpt", ckpt, "--out", out])
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()

    head = infer.decode_head(model)

    def ours():
        steps = infer.generate(model, prompt[0].tolist(), new_tokens, GREEDY, [torch.Generator()], head=head)
        return [tokens.item() for tokens, _ in steps]

    def theirs():
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[0, prompt.shape[1]:].tolist()

    same = sum(a == b for a, b in zip(ours(), theirs()))  # also the warm-up of both
    seconds = {ours: [], theirs: []}
    for _ in range(repeats):  # interleaved, so a busy spell on a shared machine slows both alike
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            fn()
            seconds[fn].append(time.perf_counter() - t0)
    ours_tps = new_tokens / statistics.median(seconds[ours])
    theirs_tps = new_tokens / statistics.median(seconds[theirs])
    return {"decode tokens/s, ours (infer.generate)": ours_tps,
            f"decode tokens/s, transformers {transformers.__version__}": theirs_tps,
            "ours / transformers": ours_tps / theirs_tps,
            f"greedy tokens identical (of {new_tokens})": same}


def smoke_checkpoint(path: str) -> str:
    """The smoke checkpoint, trained once with config_smoke.yaml when it is missing (about a minute)."""
    if not os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        print(f"training the smoke checkpoint into {folder} ...", file=sys.stderr)
        subprocess.run([sys.executable, "train.py", "--config", "config_smoke.yaml",
                        "--set", f"training.checkpoint_dir={folder}"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return path


def seconds_to_first_token(ckpt: str, prompt: str) -> float:
    """Start `python infer.py` and wait for the first byte after the echoed prompt."""
    command = [sys.executable, "infer.py", "--ckpt", ckpt, "--prompt", prompt, "--max-new-tokens", "4",
               "--device", "cpu", "--seed", "0", "--disable-eos"]
    t0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    process.stdout.read(len(prompt.encode()) + 1)  # read() on an unbuffered pipe returns as bytes arrive
    elapsed = time.perf_counter() - t0
    process.stdout.read()
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return elapsed


def bench_first_token(ckpt: str, repeats: int) -> dict:
    def python_import_torch():
        subprocess.run([sys.executable, "-c", "import torch"], check=True)

    first_token = statistics.median(seconds_to_first_token(ckpt, "Attention is") for _ in range(repeats))
    return {"infer.py start -> first token, s": first_token,
            "  of which `python -c 'import torch'`, s": median_seconds(python_import_torch, repeats)}


def report(figures: dict) -> None:
    for name, value in figures.items():
        print(f"{name:42s} {value:10.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per decode run (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per figure (median reported)")
    p.add_argument("--smoke-ckpt", default="/tmp/bench_smoke/final.ckpt",
                   help="checkpoint for the first-token timing (trained from config_smoke.yaml if missing)")
    p.add_argument("--skip-first-token", action="store_true", help="skip the time-to-first-token figure (no infer.py run)")
    p.add_argument("--vs-transformers", action="store_true",
                   help="also time transformers' generate on the same weights (exported with convert.py)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the in-process figures (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = reference_model(args.prompt_tokens, args.new_tokens)
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    print(f"reference model: {model.num_parameters() / 1e6:.1f}M parameters, d_model 256, 4 layers, 8 heads, "
          f"4 KV heads; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    report(bench_prefill(model, prompt, args.repeats))
    report(bench_decode(model, prompt, args.new_tokens, args.repeats))
    report(bench_sampling(args.repeats))
    if not args.skip_first_token:
        report(bench_first_token(smoke_checkpoint(args.smoke_ckpt), max(args.repeats, 3)))
    if args.vs_transformers:
        report(bench_hf_generate(model, prompt, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
