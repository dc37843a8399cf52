"""Pretrain the Transformer: next-token prediction on packed text, with the loop of training.py on Lightning Fabric.

Examples:
    python train.py --config config_smoke.yaml                      # 50 steps on data/tiny_corpus.txt
    python train.py --config config_smoke.yaml --set training.max_steps=100   # resumes and re-plans the LR schedule
    python train.py --config config_smoke.yaml --no_resume          # start from scratch
    python train.py --config config.yaml                            # the real recipe: streamed English Wikipedia

Everything goes to `training.checkpoint_dir`: `epoch=E-step=S.ckpt` every `save_every` optimizer
steps (the newest `keep_last` kept), `last.ckpt` (the newest save), `best.ckpt` (lowest val loss),
`final.ckpt` (the end), `metrics.csv` and `loss_curve.png`. Running the same command again resumes,
exactly where the last checkpoint stopped; Ctrl-C (or SIGTERM) saves one first.

This file reads top to bottom in the order things happen: arguments, config, data, model,
optimizer, resume, the loop (training.fit), the final checkpoint.
"""

import argparse
import os

import training
from cli import UsageError, run_cli
from config import load_config, model_config
from data import PackedWindows, load_tokens
from model import Transformer
from sources import split_documents
from tokenizer import load_tokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see docs/CONFIG_REFERENCE.md)")
    parser.add_argument("--no_resume", "--no-resume", action="store_true",
                        help="ignore checkpoints in training.checkpoint_dir and start from scratch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.lr=1e-3 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # 1. Arguments and config: every key checked before anything heavy starts.
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    train_cfg = cfg.training

    # 2. The tokenizer fixes the vocabulary, which fixes the model's shape; then the checkpoint to resume from.
    tokenizer = load_tokenizer(cfg.data.tokenizer_name, cfg.data.offline)
    model_cfg = model_config(cfg, tokenizer.vocab_size)  # the model pads its own rows (ModelConfig.padded_vocab_size)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size {model_cfg.vocab_size} is not the tokenizer's {tokenizer.vocab_size} "
                         "tokens: remove model.vocab_size (it follows the tokenizer)")
    resume_from = None if args.no_resume or not train_cfg.auto_resume else training.find_resume_checkpoint(
        train_cfg.checkpoint_dir, model_cfg, tokenizer, "pretrain")
    if training.already_done(resume_from, train_cfg):
        return 0

    # 3. Devices and processes: from here on this is one rank of the run (Lightning started the others).
    fabric, precision, why = training.start_fabric(cfg)

    # 4. Data: documents -> held-out split -> token ids (cached) -> windows of seq_len + 1 tokens.
    train_docs, val_docs, held_out = split_documents(cfg.data)
    train_tokens = load_tokens(train_docs, tokenizer, cfg.data, "train")
    val_tokens = load_tokens(val_docs, tokenizer, cfg.data, "val")
    train_windows, val_windows = PackedWindows(train_tokens, train_cfg.seq_len), PackedWindows(val_tokens, train_cfg.seq_len)
    if len(train_windows) == 0 or len(val_windows) == 0:
        which = "training" if len(train_windows) == 0 else "validation"
        raise UsageError(f"the {which} text has fewer than seq_len+1 = {train_cfg.seq_len + 1} tokens: "
                         "add text, lower training.seq_len, or adjust data.val_docs")

    # 5. The model, initialised from the seed (the same on every rank), and its optimizer.
    fabric.seed_everything(train_cfg.seed, verbose=False)
    with fabric.init_module():
        model = Transformer(model_cfg)
    if train_cfg.compile:
        model.compile()  # in place, so parameter names (and checkpoints) stay those of the plain model
    optimizers, peak_lrs = training.make_optimizers(model, train_cfg)
    model, optimizers = training.setup(fabric, model, optimizers)

    # 6. Resume: weights, optimizer moments, random state and the loop's counters, from the checkpoint.
    state = training.restore(fabric, resume_from.path, model, optimizers, train_cfg) if resume_from else training.TrainState()

    # 7. The loop, then final.ckpt (training.fit).
    world = fabric.world_size
    tokens_per_step = training.sequences_per_step(train_cfg, world) * train_cfg.seq_len
    plan = [f"data: {len(train_tokens):,} train tokens ({len(train_windows):,} windows), "
            f"{len(val_tokens):,} val tokens; {held_out}",
            f"batch: {tokens_per_step:,} tokens per optimizer step = {train_cfg.micro_batch_size} seqs x {train_cfg.seq_len} "
            f"tokens x {train_cfg.grad_accum_steps} accum x {world} devices; "
            f"{training.step_budget(train_cfg, tokens_per_step / max(len(train_tokens), 1))}",
            f"resuming from {resume_from.path} at step {state.step}" if resume_from else "starting from scratch"]
    final = os.path.join(train_cfg.checkpoint_dir, "final.ckpt")
    run = training.Run(kind="pretrain", cfg=cfg, model_config=model_cfg, tokenizer=tokenizer,
                       tokens_per_epoch=len(train_windows) * train_cfg.seq_len, plan=plan, precision=precision,
                       precision_why=why, next_command=f"python infer.py --ckpt {final} --prompt \"Attention is\"")
    return training.fit(fabric, run, model, optimizers, peak_lrs, train_windows, val_windows, state)


if __name__ == "__main__":
    run_cli(main)
