"""Decode speed side by side: infer.generate against llama.cpp on the same weights, batch 1, greedy.

Both decoders start from the same prompt ids (our tokenizer's), take the most likely token at every
step and are timed from the first generated token to the last: tokens/s of decoding, prompt processing
excluded. Runs alternate (ours, llama.cpp per GGUF file, ours, ...) so that a busy spell on a shared
machine slows every side alike; medians are reported, and how many greedy ids agree with ours.

llama.cpp runs through node-llama-cpp's prebuilt CPU binaries (benchmarks/llama_cpp_decode.mjs), installed
once outside the repository:

    mkdir -p /tmp/llama && (cd /tmp/llama && npm i -E node-llama-cpp@3.21.1)

Examples (from the repository root; run under the CPU lock when recording numbers):

    flock /tmp/cpu.lock python benchmarks/bench_decode.py --ckpt smollm2.ckpt --llama-dir /tmp/llama --gguf smollm2_f32.gguf
    python benchmarks/bench_decode.py --ckpt smollm2.ckpt --rounds 1 --new-tokens 32     # ours only, quick look
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import infer  # noqa: E402
from tokenizer import tokenizer_for_checkpoint  # noqa: E402

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
          "no_repeat_ngram_size": 0}
LLAMA_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_decode.mjs")


def ours(model, head, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s of infer.generate (first generated token to last) and the ids it chose."""
    ids = []
    steps = infer.generate(model, prompt_ids, new_tokens, GREEDY, [torch.Generator()], head=head)
    for tokens, _ in steps:
        ids.append(tokens.item())
        if len(ids) == 1:
            first = time.perf_counter()
    return (new_tokens - 1) / (time.perf_counter() - first), ids


def llama_cpp(gguf: str, llama_dir: str, prompt_ids: list[int], new_tokens: int, threads: int):
    """Decode tokens/s of llama.cpp on one GGUF file (one fresh process, one timed run) and its ids."""
    command = ["node", LLAMA_SCRIPT, "--llama-dir", llama_dir, "--model", gguf, "--new-tokens", str(new_tokens),
               "--threads", str(threads), "--repeats", "1", "--prompt-ids", ",".join(map(str, prompt_ids))]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: {' '.join(command[:6])} ... failed:\n{run.stderr.strip()}")
    result = json.loads(run.stdout)
    return result["tokens_per_s"][0], result["ids"], result["library"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our checkpoint of the model")
    p.add_argument("--gguf", action="append", default=[], help="a GGUF file of the same weights (repeatable)")
    p.add_argument("--llama-dir", help="folder where node-llama-cpp is installed (needed with --gguf)")
    p.add_argument("--prompt", default="The history of the Roman Empire", help="prompt text, as written (no template)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians reported (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads of both decoders (default 2)")
    args = p.parse_args()
    if args.gguf and not args.llama_dir:
        p.error("--gguf needs --llama-dir (where node-llama-cpp is installed)")
    torch.set_num_threads(args.threads)

    model, ckpt = infer.load_model(args.ckpt)
    head = infer.decode_head(model)  # once, as infer.py does
    prompt_ids = infer.start_ids(tokenizer_for_checkpoint(ckpt), args.prompt)
    print(f"{args.ckpt}: {model.num_parameters() / 1e6:.1f}M parameters, fp32; prompt {len(prompt_ids)} tokens, "
          f"{args.new_tokens} new tokens, greedy, batch 1, {args.threads} threads, torch {torch.__version__}")
    ours(model, head, prompt_ids, 8)  # warm-up
    speeds = {"ours (infer.generate)": []}
    same = {}
    library = ""
    for _ in range(args.rounds):
        tps, our_ids = ours(model, head, prompt_ids, args.new_tokens)
        speeds["ours (infer.generate)"].append(tps)
        for gguf in args.gguf:
            tps, ids, library = llama_cpp(gguf, args.llama_dir, prompt_ids, args.new_tokens, args.threads)
            name = f"llama.cpp {os.path.basename(gguf)}"
            speeds.setdefault(name, []).append(tps)
            same[name] = sum(a == b for a, b in zip(our_ids, ids))
    base = statistics.median(speeds["ours (infer.generate)"])
    if library:
        print(f"llama.cpp through {library}")
    print(f"{'decoder':40s} {'tokens/s':>9s} {'ours / it':>10s} {'greedy ids = ours':>18s}")
    for name, values in speeds.items():
        median = statistics.median(values)
        agree = f"{same[name]}/{args.new_tokens}" if name in same else ""
        print(f"{name:40s} {median:9.1f} {base / median:10.2f} {agree:>18s}   runs: "
              + " ".join(f"{v:.1f}" for v in values), flush=True)


if __name__ == "__main__":
    main()
