"""Forward+backward throughput and MFU of model.py, against this machine's own measured matmul peak.

MFU (model FLOPs utilisation) = achieved training FLOP/s / peak FLOP/s, where the achieved FLOPs are
counted by model.flops_per_token (6 per matmul weight per token + attention) and the peak is the
median speed of a large square matmul measured in the same run, same dtype, same threads: the same
yardstick (training.matmul_peak_flops) as the MFU in the training log.

Examples (from the repository root):

    python benchmarks/bench_model.py                      # reference config, fp32
    python benchmarks/bench_model.py --bf16               # also bf16 autocast
    python benchmarks/bench_model.py --vocab-size 4096    # smaller output head
    python benchmarks/bench_model.py --compare-gqa        # SDPA enable_gqa vs repeat_interleave K/V
    python benchmarks/bench_model.py --malloc-heap        # also with glibc told to keep freed memory
    python benchmarks/bench_model.py --steps 5 --warmup 1 # quick look
"""

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as model_module  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from training import matmul_peak_flops  # noqa: E402  (the training log's MFU yardstick, so the two agree)


def timed(fn, steps: int, warmup: int) -> list[float]:
    """Seconds per call of fn, after `warmup` untimed calls (allocator, kernels and caches settle)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def keep_freed_memory_in_heap():
    """Stop glibc from unmapping big freed blocks.

    By default glibc serves each block of >= 32 MiB with fresh mmap pages and unmaps it on free, so
    every step page-faults and zeroes the ~400 MB logits tensors and their gradients again
    (the time shows up as system time). Serving them from the heap and never trimming it reuses them.
    Same effect as starting Python with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from <malloc.h>
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt failed")


def train_step_fn(model, idx, targets, bf16: bool):
    """One forward + backward with the language-model loss, as a training step does (no optimizer step)."""

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(idx)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def bench(config: ModelConfig, batch: int, seq: int, bf16: bool, steps: int, warmup: int, peak: float) -> dict:
    torch.manual_seed(0)
    model = Transformer(config).train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    times = timed(train_step_fn(model, idx, targets, bf16), steps, warmup)
    t = statistics.median(times)
    tokens_per_s = batch * seq / t
    flops = model.flops_per_token(seq) * tokens_per_s
    return dict(step_s=t, min_s=min(times), max_s=max(times), tokens_per_s=tokens_per_s,
                tflops=flops / 1e12, mfu=flops / peak)


def attention_only(config: ModelConfig, batch: int, seq: int, steps: int) -> dict:
    """Median ms of one causal SDPA forward+backward, K/V heads shared via enable_gqa vs copied first."""
    groups = config.n_heads // config.n_kv_heads
    q = torch.randn(batch, config.n_heads, seq, config.head_dim, requires_grad=True)
    k = torch.randn(batch, config.n_kv_heads, seq, config.head_dim, requires_grad=True)
    v = torch.randn(batch, config.n_kv_heads, seq, config.head_dim, requires_grad=True)

    def gqa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    def repeat():
        kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        F.scaled_dot_product_attention(q, kr, vr, is_causal=True).sum().backward()

    return {name: 1e3 * statistics.median(timed(fn, max(steps, 20), warmup=5))
            for name, fn in (("enable_gqa", gqa), ("repeat_interleave", repeat))}


def report(label: str, r: dict):
    print(f"{label:<28} step {r['step_s'] * 1e3:8.1f} ms (min {r['min_s'] * 1e3:.1f}, max {r['max_s'] * 1e3:.1f})"
          f"  {r['tokens_per_s']:9.0f} tok/s  {r['tflops'] * 1e3:7.1f} GFLOP/s  MFU {100 * r['mfu']:5.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=50257,
                   help="tokenizer vocabulary: logits per position (default 50257, GPT-2's; the model pads its rows to 50304)")
    p.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    p.add_argument("--n-layers", type=int, default=4, help="Transformer blocks (default 4)")
    p.add_argument("--n-heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--n-kv-heads", type=int, default=4, help="key/value heads (GQA) (default 4)")
    p.add_argument("--d-ff", type=int, default=704, help="SwiGLU hidden width (default 704)")
    p.add_argument("--swa-window", type=int, default=0, help="sliding-window attention (0 = full causal) (default 0)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul that measures the peak")
    p.add_argument("--bf16", action="store_true", help="also run under bf16 autocast (MFU vs the bf16 matmul peak)")
    p.add_argument("--malloc-heap", action="store_true",
                   help="then rerun fp32 with glibc keeping freed memory (see keep_freed_memory_in_heap)")
    p.add_argument("--compare-gqa", action="store_true",
                   help="also time K/V heads copied with repeat_interleave instead of SDPA's enable_gqa")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig(vocab_size=args.vocab_size, n_layers=args.n_layers, d_model=args.d_model,
                         n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_ff=args.d_ff,
                         max_seq_len=args.seq_len, swa_window=args.swa_window)
    probe = Transformer(config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"model: {config}")
    print(f"parameters {probe.num_parameters() / 1e6:.2f}M (non-embedding {probe.num_parameters(True) / 1e6:.2f}M), "
          f"{probe.flops_per_token(args.seq_len) / 1e6:.1f} MFLOP/token fwd+bwd, "
          f"batch {args.batch_size} x seq {args.seq_len} = {args.batch_size * args.seq_len} tokens/step")
    del probe

    cpu = torch.device("cpu")
    peak32 = matmul_peak_flops(cpu, torch.float32, n=args.peak_size, repeats=max(args.steps, 10))
    print(f"fp32 matmul peak ({args.peak_size}^3, median): {peak32 / 1e9:.1f} GFLOP/s")
    run = dict(batch=args.batch_size, seq=args.seq_len, steps=args.steps, warmup=args.warmup)
    report("fp32", bench(config, bf16=False, peak=peak32, **run))

    if args.malloc_heap:
        keep_freed_memory_in_heap()  # stays on for the runs below
        report("fp32, malloc heap", bench(config, bf16=False, peak=peak32, **run))

    heap = ", malloc heap" if args.malloc_heap else ""
    if args.compare_gqa:
        saved = model_module._SDPA_HAS_GQA
        model_module._SDPA_HAS_GQA = False  # the fallback path: copy each K/V head for its query group
        try:
            report("fp32, repeat K/V" + heap, bench(config, bf16=False, peak=peak32, **run))
        finally:
            model_module._SDPA_HAS_GQA = saved
        for label, ms in attention_only(config, args.batch_size, args.seq_len, args.steps).items():
            print(f"  attention alone, fwd+bwd, {label:<18} {ms:7.2f} ms")

    if args.bf16:
        peak16 = matmul_peak_flops(cpu, torch.bfloat16, n=args.peak_size, repeats=max(args.steps, 10))
        print(f"bf16 matmul peak ({args.peak_size}^3, median): {peak16 / 1e9:.1f} GFLOP/s")
        r = bench(config, bf16=True, peak=peak16, **run)
        report("bf16 autocast" + heap, r)
        print(f"{'':<28} (vs fp32 peak: MFU {100 * r['tflops'] * 1e12 / peak32:.1f}%)")


if __name__ == "__main__":
    main()
