"""Validation loss, perplexity and bits per byte of one checkpoint, on the held-out text it was trained against.

Examples:
    python eval_val.py --ckpt checkpoints/best.ckpt                       # config and tokenizer from the checkpoint
    python eval_val.py --ckpt checkpoints/final.ckpt --max-batches 20 --json
    python eval_val.py --ckpt checkpoints/final.ckpt --config config.yaml --device cpu
    python eval_val.py --ckpt checkpoints/final.ckpt --split test        # a Hub dataset's test split instead

Only the validation documents are tokenized (or taken from training's token cache), chosen by
`sources.split_documents`: the same held-out definition training used, so the number here is the one
training logged (run with `--max-batches training.val_batches` to score exactly the windows
training scored).

What is reported:
    val_loss  token-weighted mean negative log-likelihood (nats per token): sum of NLL / tokens scored
    val_ppl   exp(val_loss): the model is as unsure as a uniform choice among this many tokens
    val_bpb   bits per byte: sum of NLL in bits / UTF-8 bytes of the text scored. Unlike the loss, it
              does not depend on the tokenizer, so models with different vocabularies compare fairly.
Byte count: every scored target token contributes the UTF-8 bytes of its text; an EOS token (the
end of a document) counts as ONE byte, like the newline that ends a line in a text file. Its NLL
is included in both the loss and the bpb, so val_bpb = val_loss / ln(2) * tokens / bytes exactly.

`score_batch` is the project's one scorer: training's validation (training.validate), this script,
explore.py's per-token surprise and evaluate_checkpoints.py's target NLL all score tokens with it.
"""

import argparse
import copy
import json
import math
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cli import UsageError, pick_device, run_cli
from config import apply_overrides, config_from_dict, load_config
from data import PackedWindows, load_tokens
from infer import load_model
from sources import split_documents
from tokenizer import tokenizer_for_checkpoint


class BatchScore(NamedTuple):
    """How well the model predicts one batch's targets; the sums are tensors, so ranks can all-reduce them."""

    nll_sum: torch.Tensor  # () summed negative log-likelihood of the labelled targets, in nats
    tokens: torch.Tensor  # () labelled targets (labels -100 are not scored)
    correct: torch.Tensor  # () labelled targets that are the model's most likely token
    nll: torch.Tensor  # (B, T) each target's NLL, 0 where unlabelled


def score_batch(model, x, y) -> BatchScore:
    """Score next-token predictions: x (B, T) inputs, y (B, T) their targets, -100 = not scored."""
    return score_logits(model(x), y)


def score_logits(logits, y) -> BatchScore:
    """score_batch for logits (B, T, vocab_size) already computed (evaluate_checkpoints.py also reads their top-k).

    Summed, not averaged: a mean is taken once, over every token of every batch (and rank), so
    batches with fewer labelled tokens weigh less, exactly as they should.
    """
    logits = logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view(y.shape)
    labelled = y != -100
    return BatchScore(nll.sum(), labelled.sum(), (logits.argmax(-1) == y)[labelled].sum(), nll)


def text_bytes(token_ids: list[int], tokenizer) -> int:
    """UTF-8 bytes of the text these tokens spell, each EOS counted as one byte (see the module docstring).

    The tokens are decoded together rather than one by one: a single byte-level BPE token may hold
    half of a multi-byte character, which decodes alone to a 3-byte replacement character.
    """
    eos = tokenizer.eos_id
    text = tokenizer.decode([t for t in token_ids if t != eos])
    return len(text.encode("utf-8")) + sum(1 for t in token_ids if t == eos)


@torch.no_grad()
def evaluate(model, windows, tokenizer, batch_size: int = 8, max_batches: int | None = None,
             device="cpu", progress: bool = False, token_nll: bool = False) -> dict:
    """Score (x, y) windows (e.g. data.PackedWindows) with `model`; labels -100 are not scored.

    Returns {val_loss, val_ppl, val_bpb, tokens, bytes, nll_sum, batches, windows}, and with token_nll
    also "token_nll": each scored target's NLL, in order. Windows are scored in order, so consecutive
    PackedWindows give the bytes of one contiguous text.
    """
    model.eval()
    n_windows = len(windows)
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    if n_windows == 0:
        raise UsageError("no validation windows to score: the held-out text is shorter than seq_len+1 tokens")
    nll_sum = 0.0  # nats, over every scored target
    n_tokens = 0
    scored = []  # the scored target ids, for the byte count
    per_token = []  # each target's NLL (token_nll=True)
    batches = 0
    start = time.time()
    for first in range(0, n_windows, batch_size):
        pairs = [windows[i] for i in range(first, min(first + batch_size, n_windows))]
        x = torch.stack([p[0] for p in pairs]).to(device)
        y = torch.stack([p[1] for p in pairs]).to(device)
        score = score_batch(model, x, y)
        labelled = y != -100
        nll_sum += score.nll_sum.item()
        n_tokens += int(score.tokens)
        scored.extend(y[labelled].tolist())
        if token_nll:
            per_token.extend(score.nll[labelled].tolist())
        batches += 1
        if progress and sys.stderr.isatty():
            print(f"\rbatch {batches}/{math.ceil(n_windows / batch_size)} | {time.time() - start:.0f}s",
                  end="", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    n_bytes = text_bytes(scored, tokenizer)
    loss = nll_sum / n_tokens
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_bpb": nll_sum / math.log(2) / n_bytes,
              "tokens": n_tokens, "bytes": n_bytes, "nll_sum": nll_sum, "batches": batches, "windows": n_windows}
    return {**result, "token_nll": per_token} if token_nll else result


def validation_windows(cfg, tokenizer, split: str | None = None):
    """(PackedWindows of the held-out text, how it was chosen). Training documents are never tokenized."""
    if split:
        if cfg.data.val_dataset:
            raise UsageError(f"--split names a split of data.dataset, but this config validates on data.val_dataset "
                             f"{cfg.data.val_dataset}: leave --split out, or --set data.val_dataset=null")
        cfg.data.val_split = split  # split_documents refuses it for local files, which have no splits
    _, val_docs, how = split_documents(cfg.data)  # the train part is never read
    tokens = load_tokens(val_docs, tokenizer, cfg.data, "val")  # training's own val tokens when data.cache_dir has them
    return PackedWindows(tokens, cfg.training.seq_len), how


def run_config(meta: dict, config_path: str | None, overrides: list[str]):
    """The config to evaluate with: --config if given, else the one stored in the checkpoint."""
    if config_path:
        return load_config(config_path, overrides)
    if meta.get("kind") == "sft":
        raise UsageError("this is an SFT checkpoint: its validation loss (response tokens only) is the one "
                         "finetune.py logs; to measure it on plain text, pass --config with a text dataset")
    if not meta.get("config"):
        raise UsageError("this checkpoint stores no config: pass --config with the YAML it was trained with")
    return config_from_dict(apply_overrides(copy.deepcopy(meta["config"]), overrides))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint file (.ckpt)")
    parser.add_argument("--config", help="YAML config whose data: section defines the held-out text "
                                         "(default: the config stored in the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.val_docs=100 (repeatable)")
    parser.add_argument("--tokenizer", default="auto", help="auto (the copy the checkpoint carries), gpt2, or a "
                                                            "tokenizer folder: it must be the same tokenizer")
    parser.add_argument("--force-tokenizer", "--force_tokenizer", action="store_true",
                        help="use --tokenizer even though it is not the one the checkpoint was trained with")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--max-batches", "--max_batches", type=int, default=None,
                        help="score at most this many batches (default: all validation windows)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=None,
                        help="windows per forward pass (default: training.micro_batch_size)")
    parser.add_argument("--split", default=None,
                        help="evaluate this split of a Hub dataset (e.g. test) instead of the held-out documents")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for name in ("max_batches", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    meta = ckpt["meta"]
    cfg = run_config(meta, args.config, args.set)
    if cfg.training.seq_len > model.config.max_seq_len:
        raise UsageError(f"training.seq_len {cfg.training.seq_len} exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}: use --set training.seq_len={model.config.max_seq_len}")
    tokenizer = tokenizer_for_checkpoint(ckpt, args.tokenizer, cfg.data.offline, args.force_tokenizer)
    windows, how = validation_windows(cfg, tokenizer, args.split)
    batch_size = args.batch_size or cfg.training.micro_batch_size
    result = evaluate(model, windows, tokenizer, batch_size, args.max_batches, device, progress=not args.json)
    result.update({"checkpoint": args.ckpt, "step": meta.get("step"), "seq_len": cfg.training.seq_len,
                   "batch_size": batch_size, "held_out": how, "device": str(device), "tokenizer": tokenizer.spec,
                   "logged_val_loss": meta.get("val_loss")})
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.ckpt} (step {meta.get('step')}), {how}")
    print(f"scored {result['tokens']:,} tokens = {result['bytes']:,} bytes in {result['windows']} windows "
          f"of {cfg.training.seq_len} ({result['batches']} batches of {batch_size}) on {device}")
    print(f"val_loss {result['val_loss']:.4f} | val_ppl {result['val_ppl']:.2f} | val_bpb {result['val_bpb']:.4f}")
    if meta.get("val_loss") is not None:  # differs slightly when training ran in bf16/fp16 (this runs in fp32)
        print(f"(training logged val_loss {meta['val_loss']:.4f} for this checkpoint, over at most "
              f"{cfg.training.val_batches} batches, in precision {cfg.training.precision})")
    return 0


if __name__ == "__main__":
    run_cli(main)
