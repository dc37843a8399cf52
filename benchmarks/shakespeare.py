"""Quality per CPU-minute: bits per byte on held-out tiny Shakespeare after a fixed wall-clock budget.

Examples:
    python benchmarks/shakespeare.py --corpus ../shared/data/tinyshakespeare.txt                 # 206 s budget
    python benchmarks/shakespeare.py --corpus ../shared/data/tinyshakespeare.txt --budget-s 600 --keep runs/shake
    python benchmarks/shakespeare.py --corpus ../shared/data/tinyshakespeare.txt --set training.lr=2e-3

The convention of the best-known small-GPT baselines: the first 90% of the corpus bytes are the
training text, the last 10% the validation text. Everything runs inside the budget, through the
scripts a user runs: train_tokenizer.py learns a BPE on the training text only, train.py trains
with config_shakespeare.yaml (the learner's recipe) for what is left of the budget (training.max_time), and the final
weights are scored on every validation byte. The validation text is written to a file that only
evaluation reads (train.py's own validation and the scoring here); the tokenizer never sees it.

Run it on a quiet machine (`flock` keeps other benchmarks off): torch's threads spin while they wait
for each other (OpenMP's default), which made training ~1.4x faster than sleeping threads when the two
cores were free, and 2-4x slower when another process wanted one. On a shared machine, set
OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1 (docs/PERFORMANCE.md measures all three).

Printed: ONE line with val bpb (sum of NLL in bits / UTF-8 bytes of the validation text), the wall
time of the whole benchmark, tokens trained on, parameters, and MFU (model FLOPs per second of
training against the machine's measured fp32 matmul peak).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import UsageError, reject_non_finite, run_cli  # noqa: E402  (light: no torch)

CONFIG = os.path.join(ROOT, "config_shakespeare.yaml")  # the learner's recipe, with the benchmark's own paths
# Seconds of the budget not given to training.max_time: train.py's start-up (imports, tokenizer, peak
# measurement), its final checkpoint, and the scoring here: ~14 s measured on the 2-core CPU (of which ~8 s
# import Lightning Fabric), plus ~4 s of margin for a noisy machine (docs/PERFORMANCE.md).
RESERVE_S = 18.0


def split_corpus(corpus: str, folder: str) -> tuple[str, str]:
    """Write the first 90% of the corpus bytes to folder/train.txt and the rest to folder/val.txt.

    The cut moves back to the start of a UTF-8 character if it falls inside one (never for ASCII).
    """
    with open(corpus, "rb") as f:
        raw = f.read()
    cut = int(len(raw) * 0.9)
    while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # a continuation byte: not a character start
        cut -= 1
    paths = os.path.join(folder, "train.txt"), os.path.join(folder, "val.txt")
    for path, part in zip(paths, (raw[:cut], raw[cut:])):
        with open(path, "wb") as f:
            f.write(part)
    return paths


def commands(train_txt: str, val_txt: str, folder: str, vocab_size: int, max_time: float, overrides: list[str]):
    """The two commands a user would type: learn the tokenizer (training text only), then train."""
    tokenizer_dir = os.path.join(folder, "tokenizer")
    tokenizer = [sys.executable, os.path.join(ROOT, "train_tokenizer.py"), "--input", train_txt,
                 "--vocab-size", str(vocab_size), "--out", tokenizer_dir, "--overwrite"]
    sets = [f"data.dataset={train_txt}", f"data.val_dataset={val_txt}", f"data.tokenizer_name={tokenizer_dir}",
            f"data.cache_dir={os.path.join(folder, 'tokens')}", f"training.checkpoint_dir={os.path.join(folder, 'ckpt')}",
            f"training.max_time={max_time:.1f}", *overrides]
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--no_resume"]
    for item in sets:
        train += ["--set", item]
    return tokenizer, train


def run(command: list[str], log, start: float) -> None:
    """Run a step, its output into the log file; on failure, show the log's end and stop."""
    log.write(f"[{time.time() - start:.1f} s] $ {' '.join(command)}\n")
    log.flush()
    result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.write(f"[{time.time() - start:.1f} s] {os.path.basename(command[1])} done\n")
    if result.returncode != 0:
        log.flush()
        with open(log.name, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise UsageError(f"{os.path.basename(command[1])} failed (exit {result.returncode}); its log ends:\n{tail}")


def score_text(model, tokenizer, text: str, seq_len: int, batch_size: int = 32) -> dict:
    """Bits per byte of `text` under `model`: every byte scored once, in windows of seq_len tokens.

    The text is encoded whole, preceded by EOS (a document starts after an EOS in training), then
    cut into consecutive windows; each target token is predicted from the tokens before it in its
    window. The last window is padded with labels -100, which eval_val.evaluate does not score.
    """
    import torch

    from eval_val import evaluate

    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    windows = []
    for start in range(0, len(ids) - 1, seq_len):
        x, y = ids[start:start + seq_len], ids[start + 1:start + seq_len + 1]
        pad = seq_len - len(y)
        windows.append((torch.tensor(x + [tokenizer.eos_id] * (seq_len - len(x))), torch.tensor(y + [-100] * pad)))
    result = evaluate(model, windows, tokenizer, batch_size)
    if result["bytes"] != len(text.encode("utf-8")):  # every byte scored exactly once, no more, no less
        raise AssertionError(f"scored {result['bytes']} bytes, the validation text has {len(text.encode('utf-8'))}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="tiny Shakespeare text file (read in place, never copied "
                                                        "into the repository)")
    parser.add_argument("--budget-s", "--budget_s", type=float, default=206.0,
                        help="wall-clock seconds for everything: tokenizer, tokenizing, training, scoring (default 206)")
    parser.add_argument("--vocab-size", "--vocab_size", type=int, default=1024, help="BPE vocabulary (default 1024)")
    parser.add_argument("--reserve-s", "--reserve_s", type=float, default=RESERVE_S,
                        help=f"seconds of the budget kept for start-up and scoring (default {RESERVE_S:g})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of config_shakespeare.yaml, as train.py --set does (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (tokenizer, checkpoint, log); "
                                                      "default: a temporary folder, deleted at the end")
    args = parser.parse_args(argv)
    reject_non_finite(args)
    return args


def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    if not os.path.isfile(args.corpus):
        raise UsageError(f"corpus not found: {args.corpus} (pass the tiny Shakespeare text file to --corpus)")
    folder = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="shakespeare-")
    os.makedirs(folder, exist_ok=True)
    try:
        with open(os.path.join(folder, "log.txt"), "w", encoding="utf-8") as log:
            train_txt, val_txt = split_corpus(args.corpus, folder)
            tokenizer_cmd, _ = commands(train_txt, val_txt, folder, args.vocab_size, 1.0, args.set)
            run(tokenizer_cmd, log, start)
            max_time = args.budget_s - (time.time() - start) - args.reserve_s
            if max_time <= 0:
                raise UsageError(f"--budget-s {args.budget_s:g} leaves no time to train after "
                                 f"{time.time() - start:.0f} s of set-up and {args.reserve_s:g} s reserved")
            _, train_cmd = commands(train_txt, val_txt, folder, args.vocab_size, max_time, args.set)
            run(train_cmd, log, start)
        line = evaluate_run(folder, val_txt)
        print(f"{line} | wall {time.time() - start:.1f} s (budget {args.budget_s:g} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def evaluate_run(folder: str, val_txt: str) -> str:
    """Score the final checkpoint on the validation text; the summary line without the wall time."""
    from infer import load_model
    from tokenizer import tokenizer_for_checkpoint

    model, ckpt = load_model(os.path.join(folder, "ckpt", "final.ckpt"), "cpu")
    meta = ckpt["meta"]
    tokenizer = tokenizer_for_checkpoint(ckpt)
    with open(val_txt, encoding="utf-8") as f:
        text = f.read()
    seq_len = meta["config"]["training"]["seq_len"]
    result = score_text(model, tokenizer, text, seq_len)
    mfu = meta["tokens_seen"] * model.flops_per_token(seq_len) / meta["train_time"] / meta["matmul_peak_flops"]
    return (f"shakespeare: val_bpb {result['val_bpb']:.4f} | {meta['tokens_seen']:,} tokens seen in "
            f"{meta['step']:,} steps, {meta['train_time']:.0f} s | {meta['n_params']:,} params | MFU {100 * mfu:.1f}% "
            f"(fp32 peak {meta['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    run_cli(main)
