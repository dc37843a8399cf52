"""The training loop that train.py (pretraining) and finetune.py (instruction tuning) share, on Lightning Fabric.

Read `fit` first: one optimizer step per turn of its loop, written out in the order it happens
(learning rate, micro-batches, backward, clipping, optimizer step, logging, validation, checkpoints,
stopping). Everything else here is what that loop calls:

    fabric, precision, why = start_fabric(cfg)          # devices, precision, DDP/FSDP: Lightning's job
    optimizers, peak_lrs = make_optimizers(model, cfg.training)
    model, optimizers = setup(fabric, model, optimizers)
    state = restore(fabric, resume_from.path, model, optimizers, cfg.training) if resume_from else TrainState()
    fit(fabric, run, model, optimizers, peak_lrs, train_samples, val_samples, state)

Lightning does what is hard to get right and easy to get wrong on many devices: launching one process
per device, autocast, syncing gradients, sharding, gathering a checkpoint. The loop itself, and all the
state needed to resume it exactly (a plain dict saved in every checkpoint), are ours.
"""

from __future__ import annotations  # type hints may name classes defined further down (the loop comes first)

import dataclasses
import glob
import logging
import math
import os
import shlex
import signal
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from checkpoint import META_SUFFIX, link_checkpoint, load_checkpoint, model_config_of, read_meta, save_checkpoint
from cli import UsageError, pick_device
from data import ShuffledPasses, StridedSampler
from config import Config, Training
from lora import describe, same_adapters
from eval_val import score_batch
from model import ModelConfig
from tokenizer import Tokenizer

EXIT_DIVERGED = 1  # the loss or the weights became inf/nan (the last good checkpoint is kept)
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's codes for these signals


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def fit(fabric, run: Run, model, optimizers: dict, peak_lrs: dict, train_samples, val_samples, state: TrainState,
        collate_fn=None) -> int:
    """Train until training.max_steps, max_time, early stopping, a non-finite loss or a stop signal.

    Returns the exit code: 0 done (final.ckpt written), 1 diverged (the last good checkpoint kept),
    130/143 stopped by SIGINT/SIGTERM (a checkpoint saved: the same command resumes).
    """
    train_cfg = run.cfg.training
    world = fabric.world_size
    folder = train_cfg.checkpoint_dir
    network = model.module if hasattr(model, "module") else model  # the Transformer inside Fabric's wrapper
    flops_per_token = network.flops_per_token(train_cfg.seq_len)
    peak = run.peak_flops = matmul_peak_flops(fabric.device)
    samples_per_step = sequences_per_step(train_cfg, world)
    end = None if train_cfg.max_steps is None else train_cfg.max_steps * samples_per_step  # None: time-boxed, no last sample
    batches = iter(loader(train_samples, train_cfg, fabric, state.step * samples_per_step, end, shuffle=True,
                          collate_fn=collate_fn, workers=run.cfg.hardware.num_workers))
    lock = claim_run_folder(fabric, folder, fresh=state.step == 0)  # before anything touches the folder
    stop = StopSignal(announce=fabric.is_global_zero)
    try:
        # metrics.csv: Lightning's CSV logger starts the file afresh, so a resumed run first logs again the
        # rows up to its checkpoint (dropping any that an interrupted run wrote after it).
        for row in logged_rows(os.path.join(folder, "metrics.csv"), state.step) if fabric.is_global_zero else []:
            fabric.log_dict({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        if fabric.is_global_zero:
            print(f"model: {network.num_parameters():,} parameters "
                  f"({network.num_parameters(exclude_embeddings=True):,} without embeddings), "
                  f"{flops_per_token / 1e6:.1f} MFLOPs/token (fwd+bwd)")
            print("\n".join(run.plan))
            print(f"device: {fabric.device.type} x {world}, precision {run.precision} ({run.precision_why}); "
                  f"matmul peak {peak / 1e9:.0f} GFLOP/s (fp32, measured; MFU is against it"
                  f"{', even in half precision' if run.precision not in ('32', '32-true') else ''})", flush=True)
            if train_cfg.max_time:
                print(f"time budget: {train_cfg.max_time:g} s of training (training.max_time); the LR schedule follows "
                      "the clock")
        started = time.monotonic()
        time_before = state.train_time  # seconds trained by the runs this one resumes
        start_step = state.step
        # Since the last log line: when it was, the counters then, each step's loss and global gradient norm.
        log_start = started
        log_tokens = state.tokens_seen
        log_supervised = state.supervised_seen
        losses = []
        grad_norms = []
        while train_cfg.max_steps is None or state.step < train_cfg.max_steps:
            # 1. The learning rate of this step: the one place it is set.
            lr_scale = lr_multiplier(state.step - state.schedule_offset, train_cfg, state.train_time, state.plateau_scale)
            for name, optimizer in optimizers.items():
                for group, peak_lr in zip(optimizer.param_groups, peak_lrs[name]):
                    group["lr"] = peak_lr * lr_scale

            # 2. Forward and backward over grad_accum_steps micro-batches: the gradients add up. Ranks average
            #    their gradients once, in the last backward (no_backward_sync skips it in the others).
            loss_sum = 0.0
            tokens = 0  # input positions of this rank's micro-batches
            supervised = 0  # of them, those with a label
            for micro in range(train_cfg.grad_accum_steps):
                x, y = next(batches)
                x, y = x.to(fabric.device), y.to(fabric.device)  # (B, T) token ids, (B, T) next-token labels
                with fabric.no_backward_sync(model, enabled=world > 1 and micro < train_cfg.grad_accum_steps - 1):
                    loss = token_loss(model(x), y)
                    fabric.backward(loss / train_cfg.grad_accum_steps)
                loss_sum += loss.detach()
                tokens += x.numel()
                supervised += (y != -100).sum()

            # 3. One exchange between ranks per step (mean loss, token counts, the clock, a stop signal), so that
            #    every rank takes the same decision (the LR, stopping) at the same step.
            elapsed = time_before + time.monotonic() - started
            mine = [float(loss_sum) / train_cfg.grad_accum_steps, tokens, float(supervised), elapsed,
                    float(stop.received is not None)]
            summed = fabric.all_reduce(torch.tensor(mine, device=fabric.device), reduce_op="sum").tolist()
            loss_total, tokens, supervised, elapsed_total, stop_votes = summed  # sums over the ranks
            loss_mean = loss_total / world
            elapsed = elapsed_total / world
            stopping = stop_votes > 0  # any rank signalled: all stop at this step
            if not math.isfinite(loss_mean):
                raise FloatingPointError(f"loss became {loss_mean} at step {state.step}")

            # 4. Clip the gradients' global norm (once, over every parameter), then step each optimizer.
            grad_norms.append(clip_gradients(fabric, model, optimizers, train_cfg.grad_clip))
            for optimizer in optimizers.values():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += round(tokens)
            state.supervised_seen += round(supervised)
            state.train_time = elapsed
            losses.append(loss_mean)
            out_of_time = bool(train_cfg.max_time) and state.train_time >= train_cfg.max_time
            last_step = state.step == train_cfg.max_steps or out_of_time

            # 5. A log line and a metrics row every log_every steps (and at the last): loss, LR, speed, MFU, ETA.
            if state.step % train_cfg.log_every == 0 or last_step:
                now = time.monotonic()
                state.last_train_loss = sum(losses) / len(losses)
                grad_norm = float(torch.stack(grad_norms).mean())
                tok_s = (state.tokens_seen - log_tokens) / max(now - log_start, 1e-9)
                sup_s = (state.supervised_seen - log_supervised) / max(now - log_start, 1e-9)
                mfu = tok_s * flops_per_token / peak / world
                eta = math.inf  # time-boxed (max_steps null): only max_time's rest, below
                if train_cfg.max_steps is not None:
                    eta = (now - started) / max(state.step - start_step, 1) * (train_cfg.max_steps - state.step)
                if train_cfg.max_time:
                    eta = min(eta, max(0.0, train_cfg.max_time - state.train_time))
                lr = next(iter(optimizers.values())).param_groups[0]["lr"]
                if fabric.is_global_zero:
                    # SFT: tok/s counts every position computed (padding included), supervised tok/s the trained-on ones.
                    sup_text = f"{sup_s:,.0f} supervised tok/s | " if run.kind == "sft" else ""
                    print(f"{step_of(state.step, train_cfg)} | loss {state.last_train_loss:.4f} | lr {lr:.2e} | "
                          f"grad norm {grad_norm:.3f} | "
                          f"{tok_s:,.0f} tok/s | {sup_text}MFU {100 * mfu:.1f}% | "
                          f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
                fabric.log_dict({"epoch": epochs(run, state), "tokens_seen": state.tokens_seen,
                                 "train_loss": state.last_train_loss, "grad_norm": grad_norm, "lr": lr,
                                 "tokens_per_s": tok_s,
                                 "supervised_tokens_per_s": sup_s, "mfu": mfu, "elapsed_s": state.train_time},
                                step=state.step)
                log_start = now
                log_tokens = state.tokens_seen
                log_supervised = state.supervised_seen
                losses = []
                grad_norms = []

            # 6. Validation every val_every steps: log it, keep the best weights, cut the LR or stop on a plateau.
            early_stop = False
            if train_cfg.val_every and state.step % train_cfg.val_every == 0:
                early_stop = run_validation(fabric, run, model, optimizers, val_samples, state, collate_fn)

            # 7. A checkpoint every save_every steps (after this step's validation, so that it records it), and
            #    when a signal asks to stop.
            interrupted = stopping and not last_step
            if train_cfg.save_every and state.step % train_cfg.save_every == 0 or interrupted:
                save(fabric, run, f"epoch={int(epochs(run, state) or 0)}-step={state.step}.ckpt", model,
                     optimizers, state)
                if fabric.is_global_zero:
                    prune(folder, train_cfg.keep_last)

            # 8. Stop early?
            if interrupted:
                if fabric.is_global_zero:
                    last = os.path.join(folder, "last.ckpt")
                    print(f"interrupted at step {state.step}: saved {last} ({file_size(last)}); to resume, "
                          f"run the same command again: {resume_command()}", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED.get(stop.received, 130)
            if early_stop or out_of_time:
                break

        # The end: validate the final weights (unless this very step did), write final.ckpt (weights only)
        # and, unless this step's periodic save did, a checkpoint to resume from: raise max_steps, run again.
        if state.validated_at != state.step:
            run_validation(fabric, run, model, optimizers, val_samples, state, collate_fn)
        if not (train_cfg.save_every and state.step % train_cfg.save_every == 0):
            save(fabric, run, f"epoch={int(epochs(run, state) or 0)}-step={state.step}.ckpt", model, optimizers,
                 state)
            if fabric.is_global_zero:
                prune(folder, train_cfg.keep_last)
        resume_path = periodic_checkpoints(folder)[-1] if fabric.is_global_zero else None
        final = save(fabric, run, "final.ckpt", model, optimizers, state, resumable=False)
    except FloatingPointError as e:  # a non-finite loss, or weights about to be saved
        if fabric.is_global_zero:
            print(f"error: {e}: lower training.lr or use training.precision: 32; the last good checkpoint is kept",
                  file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    finally:
        stop.restore()
        if lock:
            lock.close()  # releases the run folder
    if fabric.is_global_zero:
        print(f"done: {final} ({file_size(final)}, weights only; {resume_path} {file_size(resume_path)} adds the "
              f"optimizer state to resume from) (val_loss {state.last_val_loss:.4f}); try: {run.next_command}",
              flush=True)
    return 0


def step_of(step: int, train_cfg: Training) -> str:
    """'step 40/100' for the log lines; 'step 40 (time-boxed: 180 s)' when max_time alone ends the run."""
    if train_cfg.max_steps is None:
        return f"step {step} (time-boxed: {train_cfg.max_time:g} s)"
    return f"step {step}/{train_cfg.max_steps}"


def step_budget(train_cfg: Training, epochs_per_step: float) -> str:
    """The plan's '1000 steps = 2.35 epochs', or, when max_time alone ends the run, its time."""
    if train_cfg.max_steps is None:
        return f"time-boxed: {train_cfg.max_time:g} s, no step limit (a step = {epochs_per_step:.4f} epochs)"
    return f"{train_cfg.max_steps} steps = {train_cfg.max_steps * epochs_per_step:.2f} epochs"


def run_validation(fabric, run: Run, model, optimizers, val_samples, state: TrainState, collate_fn) -> bool:
    """Validate, log, draw the loss curve, save best.ckpt on a new best, apply plateau rules; True = stop early."""
    train_cfg = run.cfg.training
    val_loss, val_acc = validate(fabric, model, val_samples, train_cfg, collate_fn)
    state.last_val_loss, state.validated_at = val_loss, state.step
    if fabric.is_global_zero:
        print(f"{step_of(state.step, train_cfg)} | val_loss {val_loss:.4f} | val_ppl {math.exp(min(val_loss, 50)):.2f} "
              f"| val_acc {val_acc:.3f}", flush=True)
    fabric.log_dict({"epoch": epochs(run, state), "tokens_seen": state.tokens_seen, "val_loss": val_loss,
                     "val_ppl": math.exp(min(val_loss, 50)), "val_acc": val_acc, "elapsed_s": state.train_time},
                    step=state.step)
    if fabric.is_global_zero and "csv" in train_cfg.loggers:
        draw_loss_curve(train_cfg.checkpoint_dir, f"{run.kind} loss")
    if val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
        save(fabric, run, "best.ckpt", model, optimizers, state)
    cut, stop = after_validation(state, val_loss, train_cfg)
    if fabric.is_global_zero and cut:
        print(f"step {state.step}: val loss has not improved for {train_cfg.reduce_on_plateau.patience} validations, "
              f"LR cut to {train_cfg.lr * lr_multiplier(state.step - state.schedule_offset, train_cfg, state.train_time, state.plateau_scale):.2e}",
              flush=True)
    if fabric.is_global_zero and stop:
        print(f"step {state.step}: early stopping, val loss has not improved for {state.stale} validations "
              f"(best {state.plateau_best:.4f})", flush=True)
    return stop


@torch.no_grad()
def validate(fabric, model, val_samples, train_cfg: Training, collate_fn=None) -> tuple[float, float]:
    """(val loss, val accuracy) over at most val_batches batches per rank, weighted by labelled tokens.

    Each rank scores its share; the sums are added across ranks, so the result is the exact token mean.
    """
    model.eval()
    n = min(len(val_samples), train_cfg.val_batches * train_cfg.micro_batch_size * fabric.world_size)
    totals = torch.zeros(3, device=fabric.device)  # summed NLL, correct top-1 predictions, labelled tokens
    for x, y in loader(val_samples, train_cfg, fabric, 0, n, shuffle=False, collate_fn=collate_fn):
        score = score_batch(model, x.to(fabric.device), y.to(fabric.device))  # eval_val.py's scorer
        totals += torch.stack([score.nll_sum, score.correct.float(), score.tokens.float()])
    model.train()
    nll, correct, count = fabric.all_reduce(totals, reduce_op="sum").tolist()
    return nll / max(count, 1), correct / max(count, 1)


# ---------------------------------------------------------------------------------------------
# The state of a run: everything a checkpoint needs to continue exactly
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The loop's plain state, saved in every checkpoint's meta and restored on resume.

    Weights, optimizer moments and the random generator's state are saved beside it. The data position
    needs no field: the sampler derives it from `step`.
    """

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # input tokens of every rank (padding included)
    supervised_seen: int = 0  # tokens with a label: all in pretraining, the responses in SFT
    train_time: float = 0.0  # seconds of training (validation included) over every run of this training
    schedule_offset: int = 0  # the LR schedule counts steps from here (reset_lr_on_resume)
    best_val_loss: float = math.inf  # best.ckpt holds the weights that reached it
    last_train_loss: float | None = None
    last_val_loss: float | None = None
    # Validation-driven decisions: the plateau LR factor, and validations without improvement counted
    # for early stopping and (separately, reset by each cut) for the next plateau cut.
    plateau_scale: float = 1.0
    plateau_best: float = math.inf
    stale: int = 0
    stale_since_cut: int = 0
    validated_at: int | None = field(default=None, metadata={"saved": False})


def after_validation(state: TrainState, val_loss: float, train_cfg: Training) -> tuple[bool, bool]:
    """Update the plateau counters with a new val loss; returns (cut the LR, stop early).

    Both count validations since val loss last beat its best by more than early_stopping.min_delta. A cut
    does not reset the early-stopping count (a cut that does not help must still lead to stopping), and
    it lasts: lr_multiplier multiplies plateau_scale in at every step.
    """
    if val_loss < state.plateau_best - train_cfg.early_stopping.min_delta:
        state.plateau_best, state.stale, state.stale_since_cut = val_loss, 0, 0
        return False, False
    state.stale += 1
    state.stale_since_cut += 1
    cut = train_cfg.lr_schedule == "plateau" and state.stale_since_cut >= train_cfg.reduce_on_plateau.patience
    if cut:
        state.plateau_scale *= train_cfg.reduce_on_plateau.factor
        state.stale_since_cut = 0
    return cut, train_cfg.early_stopping.enabled and state.stale >= train_cfg.early_stopping.patience


@dataclass
class Run:
    """What a run is, as its checkpoints record it (meta) and its log lines describe it."""

    kind: str  # pretrain | sft
    cfg: Config
    model_config: ModelConfig
    tokenizer: Tokenizer  # every checkpoint carries it
    tokens_per_epoch: int  # training tokens in one pass over the data (padding included in SFT)
    plan: list  # start-up lines that describe the data, the batches and the starting point
    next_command: str  # suggested when the run is done
    precision: str = "32"  # Lightning's precision setting, and why it was chosen (start_fabric)
    precision_why: str = ""
    peak_flops: float | None = None  # measured fp32 matmul FLOP/s: the yardstick of the MFU figures
    chat_template: str | None = None  # SFT of an imported chat model: the template it was trained on (chat.py)
    lora: dict | None = None  # finetune.lora's settings in a LoRA run (lora.py), else None


# ---------------------------------------------------------------------------------------------
# Learning rate, optimizer, gradients and loss
# ---------------------------------------------------------------------------------------------


def lr_multiplier(step: int, train_cfg: Training, elapsed: float = 0.0, plateau_scale: float = 1.0) -> float:
    """The learning rate of optimizer step `step` as a fraction of the peak (training.lr).

    First a linear warm-up: 1/W, 2/W, ... 1 over W = warmup_ratio * max_steps steps. Then, by lr_schedule:
      warmup_cosine  a half cosine down to min_lr_ratio at max_steps;
      wsd            warm-up, stable, decay: flat at the peak, then a straight line down to min_lr_ratio
                     over the last cooldown_ratio of the run;
      plateau        flat, multiplied by `plateau_scale`, which validation cuts when the loss stalls
                     (never below reduce_on_plateau.min_lr).
    With training.max_time the same shape is laid over the share of the budget used after `elapsed`
    seconds, p = max((step + 1) / max_steps, elapsed / max_time) (p = elapsed / max_time when max_steps is
    null): warm-up while p < warmup_ratio, and the schedule reaches its floor exactly when time (or steps)
    run out, however fast the machine is.
    """
    if train_cfg.max_time:
        used = elapsed / train_cfg.max_time
        if train_cfg.max_steps is not None:
            used = max(used, (step + 1) / train_cfg.max_steps)
        if used < train_cfg.warmup_ratio:
            return used / train_cfg.warmup_ratio
        progress = (used - train_cfg.warmup_ratio) / (1 - train_cfg.warmup_ratio)
    else:
        warmup = int(train_cfg.warmup_ratio * train_cfg.max_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, train_cfg.max_steps - warmup)
    progress = min(1.0, progress)  # share of the run after warm-up
    if train_cfg.lr_schedule == "plateau":
        return max(plateau_scale, train_cfg.reduce_on_plateau.min_lr / train_cfg.lr)
    if train_cfg.lr_schedule == "wsd":
        cooling = max(0.0, progress - (1 - train_cfg.cooldown_ratio)) / train_cfg.cooldown_ratio  # 0 until the cool-down, then to 1
        return 1 - (1 - train_cfg.min_lr_ratio) * cooling
    return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizers(model: torch.nn.Module, train_cfg: Training) -> tuple[dict, dict]:
    """({name: optimizer}, {name: [peak lr of each param group]}), for training.optimizer:

    adamw  AdamW for everything, with weight decay on matrices only (decaying norm gains only hurts).
    muon   Muon (momentum, then each update orthogonalised by Newton-Schulz iterations) for the hidden
           matrices, the attention and MLP projections, at training.muon_lr and without weight decay; AdamW,
           as above, for the rest: the embedding and output head (matrices that map tokens, not features)
           and the norm gains.
    The peak learning rates come from the config, not from a restored optimizer, so a resumed run
    follows the config it is given now.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden = {name for name, p in params.items() if p.dim() == 2 and name.startswith("blocks.")}
    adamw_params = [p for name, p in params.items() if train_cfg.optimizer == "adamw" or name not in hidden]
    groups = [{"params": [p for p in adamw_params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
              {"params": [p for p in adamw_params if p.dim() < 2], "weight_decay": 0.0}]
    optimizers = {"adamw": torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=train_cfg.eps)}
    peak_lrs = {"adamw": [train_cfg.lr, train_cfg.lr]}
    if train_cfg.optimizer == "muon":
        matrices = [p for name, p in params.items() if name in hidden]
        optimizers["muon"] = torch.optim.Muon(matrices, lr=train_cfg.muon_lr, weight_decay=0.0, momentum=0.95,
                                              nesterov=True, ns_steps=train_cfg.muon_ns_steps)
        peak_lrs["muon"] = [train_cfg.muon_lr]
    return optimizers, peak_lrs


def sequences_per_step(train_cfg: Training, world_size: int) -> int:
    """Sequences in one optimizer step: micro_batch_size on each device, grad_accum_steps times, on every device."""
    return train_cfg.micro_batch_size * train_cfg.grad_accum_steps * world_size


def clip_gradients(fabric, model, optimizers: dict, max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm) and return the global norm before clipping.

    The norm is ONE number over every parameter of the model, whichever optimizer steps it: clipping each
    optimizer's own parameters (Muon's matrices, AdamW's embeddings and norms) to max_norm separately would let
    the update grow with the number of optimizers. With one optimizer, Fabric clips (it unscales float16
    gradients and knows FSDP's shards); with several (training.optimizer muon, which config.py allows only
    without float16 loss scaling and without FSDP) every gradient is a plain local tensor, and torch clips them
    together. max_norm 0 clips nothing (the norm is still measured, for the log).
    """
    limit = max_norm or math.inf
    if len(optimizers) == 1:
        norm = fabric.clip_gradients(model, next(iter(optimizers.values())), max_norm=limit, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit, error_if_nonfinite=False)
    return norm.detach()


def token_loss(logits, labels):
    """Mean cross-entropy over the labelled positions of (B, T, vocab) logits and (B, T) labels.

    Labels -100 are not scored, so one loss serves packed text (every token supervised) and instruction
    data (only the responses). A batch with no label at all gives 0 (and zero gradients), not nan.
    """
    summed = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return summed / (labels != -100).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def loader(samples, train_cfg: Training, fabric, start: int, stop: int | None, shuffle: bool, collate_fn=None, workers: int = 0):
    """A DataLoader over samples[start:stop] (in seeded epochs when shuffle), this rank's share only; stop
    None: to the end (endless when shuffle: a time-boxed run, which max_time ends).

    The sampler hands rank r the samples start+r, start+r+world, ...: sharding happens once, here. A
    generator of its own keeps the DataLoader from drawing on the global random state (dropout's).
    """
    dataset = ShuffledPasses(samples, train_cfg.seed) if shuffle else samples
    sampler = StridedSampler(start, len(dataset) if stop is None else stop, fabric.global_rank, fabric.world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=train_cfg.micro_batch_size, sampler=sampler, drop_last=shuffle,
                                       num_workers=workers, persistent_workers=workers > 0, collate_fn=collate_fn,
                                       generator=torch.Generator())


# ---------------------------------------------------------------------------------------------
# Stopping on a signal
# ---------------------------------------------------------------------------------------------


class StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM (kill, a container stop, a cluster scheduler) asks the loop to stop.

    The first signal only sets `received`: the loop finishes the optimizer step it is in, saves a
    checkpoint and exits. A second Ctrl-C stops at once, without saving.
    """

    def __init__(self, announce: bool):
        self.received, self.announce = None, announce
        self.previous = {s: signal.signal(s, self.handle) for s in EXIT_INTERRUPTED}

    def handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command() -> str:
    """The command that started this run, without --no_resume: what to type to continue it."""
    return "python " + shlex.join(a for a in sys.argv if a not in ("--no_resume", "--no-resume"))


# ---------------------------------------------------------------------------------------------
# Lightning Fabric: devices, precision, distribution
# ---------------------------------------------------------------------------------------------


def choose_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """(Lightning precision, reason). auto: bf16 autocast where the hardware computes bf16 natively."""
    if setting != "auto":
        return setting, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "auto: this GPU supports bfloat16"
        return "16-mixed", "auto: this GPU lacks bfloat16, using float16 with loss scaling"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16-mixed", "auto: this CPU has AVX512-BF16, bf16 matmuls run faster than fp32"
    return "32", f"auto: no fast half precision on {device.type}"


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), from Linux's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def start_fabric(cfg, launch: bool = True):
    """A Lightning Fabric for cfg.hardware and cfg.training.precision, launched: on return, this process is
    one rank of the run (others, if any, were started by Lightning and run this same script).

    Returns (fabric, precision, why). A strategy this machine cannot run is refused here, in one line.
    launch=False only describes the run (finetune.py --dry-run asks it for the world size).
    """
    from lightning_fabric import Fabric  # slow to import: only when training really starts

    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)  # our own start-up lines say what matters

    hw, train_cfg = cfg.hardware, cfg.training
    device = pick_device(hw.accelerator, strict=False)
    precision, why = choose_precision(train_cfg.precision, device)
    strategy = hw.strategy
    if strategy == "fsdp":
        if device.type != "cuda":
            raise UsageError(f"hardware.strategy fsdp needs CUDA GPUs (Lightning's FSDP does not run on "
                             f"{device.type}): use hardware.strategy ddp")
        from lightning_fabric.strategies import FSDPStrategy

        from model import Block

        # Each Transformer block is one FSDP unit: its weights are gathered just before it runs and freed
        # after, so a rank never holds more than one block's full weights (plus its own shards).
        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full")
    fabric = Fabric(accelerator=device.type, devices=hw.devices, num_nodes=hw.num_nodes, strategy=strategy,
                    precision=precision, plugins=[atomic_checkpoint_io()], loggers=make_loggers(cfg))
    if launch:
        fabric.launch()
    return fabric, precision, why


def setup(fabric, model, optimizers: dict):
    """Hand the model and its optimizers to Fabric (DDP/FSDP wrapping, device placement, precision)."""
    model, *wrapped = fabric.setup(model, *optimizers.values())
    return model, dict(zip(optimizers, wrapped))


def matmul_peak_flops(device: torch.device, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> float:
    """The yardstick of model FLOPs utilisation (MFU): the median FLOP/s of a large square matmul.

    n = 2048 on a CPU (big enough to reach the machine's best), 8192 on a GPU.
    benchmarks/bench_model.py uses this same function, so its MFU and the training log's agree.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device).manual_seed(0)  # its own: the global random state is dropout's
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    times = []
    for i in range(repeats + 2):  # two untimed products first: kernels, caches and clocks settle
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the run folder
# ---------------------------------------------------------------------------------------------


def atomic_checkpoint_io():
    """Fabric's CheckpointIO plugin for our files: checkpoint.py's atomic writer and its safe loader.

    Fabric gathers the state on every rank (shards included), then rank 0 calls save_checkpoint.
    """
    from lightning_fabric.plugins import CheckpointIO

    class AtomicCheckpointIO(CheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            save_checkpoint(checkpoint, str(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return load_checkpoint(str(path), mmap=False, merge_lora=False)  # a LoRA run resumes with its adapters

        def remove_checkpoint(self, path):
            os.remove(path)

    return AtomicCheckpointIO()


def periodic_checkpoints(folder: str) -> list[str]:
    """Periodic checkpoints (epoch=E-step=S.ckpt) in `folder`, oldest step first."""
    paths = glob.glob(os.path.join(glob.escape(folder), "epoch=*-step=*.ckpt"))
    return sorted(paths, key=lambda p: int(p.rsplit("step=", 1)[1].split(".")[0]))


class ResumePoint(NamedTuple):
    """A checkpoint to continue from: its file and its meta (train_state included)."""

    path: str
    meta: dict


def find_resume_checkpoint(folder: str, model_config: ModelConfig, tokenizer: Tokenizer, kind: str,
                           lora: dict | None = None) -> ResumePoint | None:
    """The newest checkpoint in `folder` (not its subfolders) to resume from, or None.

    Only checkpoints that hold a training state count (not the weights-only best.ckpt and final.ckpt). A
    checkpoint of another architecture, tokenizer (by content: a tokenizer retrained under the same name is
    another tokenizer), kind or LoRA setting stops the run with a message instead of being silently ignored.
    """
    candidates = []
    for path in glob.glob(os.path.join(glob.escape(folder), "*.ckpt")):
        meta = read_meta(path)
        candidates.append(("train_state" in meta, meta["step"], os.path.getmtime(path), path, meta))
    if not candidates:
        return None
    _, step, _, path, meta = max(candidates, key=lambda c: c[:3])  # the newest resumable one, if any
    # Compared as load_checkpoint reads it: a file from before the model padded its own vocabulary is migrated.
    theirs, ours = vars(model_config_of(meta, path, tokenizer.vocab_size)), vars(model_config)
    for key in ours:
        if key not in model_config.ADJUSTABLE and theirs.get(key) != ours[key]:
            raise UsageError(f"cannot resume from {path}: its model.{key} is {theirs.get(key)}, the config says "
                             f"{ours[key]}; pass --no_resume to start over or set training.checkpoint_dir elsewhere")
    if meta.get("kind") != kind:
        raise UsageError(f"cannot resume from {path}: it is a {meta.get('kind')} checkpoint, this is a {kind} run; "
                         "pass --no_resume or set training.checkpoint_dir elsewhere")
    if meta.get("tokenizer_sha256") != tokenizer.sha256:
        raise UsageError(f"cannot resume from {path}: it was trained with another tokenizer than {tokenizer.spec!r} "
                         "(different tokens or rules, even if the name is the same); pass --no_resume or set "
                         "training.checkpoint_dir elsewhere")
    if not same_adapters(meta.get("lora"), lora):
        raise UsageError(f"cannot resume from {path}: it is a {describe(meta.get('lora'))} checkpoint, the config "
                         f"says {describe(lora)}; pass --no_resume or set training.checkpoint_dir elsewhere")
    if "train_state" not in meta:
        raise UsageError(f"cannot resume from {path}: it holds no training state (an imported model, or a file "
                         "from an older version); pass --no_resume or set training.checkpoint_dir elsewhere")
    return ResumePoint(path, meta)


def already_done(resume_from: ResumePoint | None, train_cfg: Training) -> bool:
    """True, and says so, when the checkpoint to resume from has already reached training.max_steps/max_time."""
    if resume_from and train_cfg.max_steps is not None and resume_from.meta["step"] >= train_cfg.max_steps:
        print(f"{resume_from.path} is already at step {resume_from.meta['step']} of training.max_steps={train_cfg.max_steps}: "
              "nothing to do (raise max_steps to train longer, or pass --no_resume)")
        return True
    trained = resume_from.meta["train_state"]["train_time"] if resume_from else 0.0
    if resume_from and train_cfg.max_time and not train_cfg.reset_lr_on_resume and trained >= train_cfg.max_time:
        print(f"{resume_from.path} has already trained {trained:.0f} s of training.max_time={train_cfg.max_time:g}: "
              "nothing to do (raise max_time to train longer, or pass --no_resume)")
        return True
    return False


def restore(fabric, path: str, model, optimizers: dict, train_cfg: Training) -> TrainState:
    """Restore weights, optimizer moments, random state and the loop's state from a checkpoint."""
    rest = fabric.load(path, {"state_dict": model, **optimizers}, strict=False, weights_only=True)
    torch.set_rng_state(rest["rng"]["torch"])
    if torch.cuda.is_available() and rest["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(rest["rng"]["cuda"])
    state = TrainState(**rest["meta"]["train_state"])
    if train_cfg.reset_lr_on_resume:  # the schedule (warm-up included) and the time budget start again here
        state.schedule_offset, state.train_time = state.step, 0.0
    return state


def save(fabric, run: Run, name: str, model, optimizers: dict, state: TrainState, resumable: bool = True) -> str:
    """Write folder/name (every rank takes part; rank 0 writes) and point last.ckpt at it.

    resumable: the optimizer state, the random state and meta["train_state"] too, all a run needs to continue
    exactly (the periodic checkpoints). Otherwise the weights only, with the tokenizer and meta (best.ckpt and
    final.ckpt: what scripts use, a third of the size with AdamW's two moments left out).
    Weights that are no longer finite are never saved: FloatingPointError instead, and the newest
    checkpoint on disk stays the last good one.
    """
    broken = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).sum()
    if fabric.all_reduce(broken.float(), reduce_op="sum") > 0:
        raise FloatingPointError(f"the weights became inf/nan by step {state.step}")
    folder = run.cfg.training.checkpoint_dir
    path = os.path.join(folder, name)
    contents = {"state_dict": model, "tokenizer": run.tokenizer.to_dict(), "meta": checkpoint_meta(run, model, state)}
    if resumable:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        contents.update(optimizers, rng=rng)
    else:
        del contents["meta"]["train_state"]  # no file to resume from (find_resume_checkpoint skips it)
    fabric.save(path, contents)
    if fabric.is_global_zero and name != "last.ckpt":
        link_checkpoint(path, os.path.join(folder, "last.ckpt"))
    return path


def checkpoint_meta(run: Run, model, state: TrainState) -> dict:
    """What every script reads about a checkpoint (plain data; repeated in the NAME.ckpt.json sidecar)."""
    saved = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.metadata.get("saved", True)}
    return {
        "kind": run.kind,
        "step": state.step,
        "epoch": epochs(run, state),
        "tokens_seen": state.tokens_seen,
        "supervised_seen": state.supervised_seen,
        "train_loss": state.last_train_loss,
        "val_loss": state.last_val_loss,
        "n_params": (model.module if hasattr(model, "module") else model).num_parameters(),
        "model_config": vars(run.model_config).copy(),
        "config": run.cfg.to_dict(),
        "tokenizer": run.tokenizer.spec,  # where it came from; the checkpoint carries the tokenizer itself
        "tokenizer_sha256": run.tokenizer.sha256,  # what it is: resume, infer and eval compare content, not names
        "train_time": round(state.train_time, 3),
        "matmul_peak_flops": run.peak_flops,
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "train_state": saved,
        **({"chat_template": run.chat_template} if run.chat_template else {}),
        **({"lora": run.lora} if run.lora else {}),  # the adapters' settings: lora.py, merged at load
    }


def epochs(run: Run, state: TrainState) -> float | None:
    """Passes over the training data so far (fractional)."""
    return round(state.tokens_seen / run.tokens_per_epoch, 4) if run.tokens_per_epoch else None


RUN_FILES = ("*.ckpt", "*.ckpt.json", "metrics.csv", "loss_curve.png", "tensorboard", "mlruns", "wandb")


def claim_run_folder(fabric, folder: str, fresh: bool):
    """Make `folder` this run's own for as long as it lives; returns the lock (release it with .close()).

    One run per folder: an exclusive lock (fcntl) on folder/.lock, which the operating system releases
    when the process ends, however it ends. A second run into the same folder stops with one line
    naming the holder. A fresh run (--no_resume, or auto_resume: false) into a folder that holds an earlier
    run first moves that run's files aside into folder/previous-DATE-TIME/, and says so: nothing of the
    earlier run is lost, and nothing of it mixes with the new one (its checkpoints, metrics.csv, best.ckpt).
    """
    import fcntl

    lock = None
    holder = None  # who holds the folder, when another run does
    moved = []  # [folder, checkpoints moved] when an earlier run was moved aside
    if fabric.is_global_zero:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
        else:
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                       f"{resume_command()}\n")
            lock.flush()
            old = [p for pattern in RUN_FILES for p in glob.glob(os.path.join(glob.escape(folder), pattern))]
            if fresh and old:
                aside = os.path.join(folder, time.strftime("previous-%Y%m%d-%H%M%S"))
                os.makedirs(aside)
                for path in old:
                    os.replace(path, os.path.join(aside, os.path.basename(path)))
                moved = [aside, len([p for p in old if p.endswith(".ckpt")])]
    holder, moved = fabric.broadcast((holder, moved))
    if holder:
        raise UsageError(f"training.checkpoint_dir {folder} is in use by another run ({holder}): wait for it to "
                         "finish, or set training.checkpoint_dir elsewhere")
    if moved and fabric.is_global_zero:
        print(f"starting afresh: the earlier run in {folder} ({moved[1]} checkpoints, its metrics.csv and loss "
              f"curve) was moved to {moved[0]}", flush=True)
    return lock


def file_size(path: str) -> str:
    """'1.62 GB', '540.3 MB': a checkpoint's size for the log lines."""
    size = os.path.getsize(path)
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def prune(folder: str, keep_last: int) -> None:
    """Delete all but the newest keep_last periodic checkpoints (0 = keep all)."""
    for old in periodic_checkpoints(folder)[:-keep_last] if keep_last else []:
        for path in (old, old + META_SUFFIX):
            if os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------------------------------------
# Metrics: Lightning's loggers (metrics.csv, and TensorBoard / W&B / MLflow when asked for)
# ---------------------------------------------------------------------------------------------


def make_loggers(cfg) -> list:
    """One Lightning logger per name in training.loggers (config.py checked that each is installed)."""
    folder = cfg.training.checkpoint_dir
    loggers = []
    for name in cfg.training.loggers:
        if name == "csv":  # folder/metrics.csv, which list.py, plots.py and explore.py read
            from lightning_fabric.loggers import CSVLogger

            # It warns that it will replace an existing metrics.csv: fit logs the rows to keep again first.
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            loggers.append(CSVLogger(folder, name="", version="", flush_logs_every_n_steps=1))
        elif name == "tensorboard":
            from lightning_fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(folder, name="tensorboard"))
        elif name == "wandb":
            from pytorch_lightning.loggers import WandbLogger

            loggers.append(WandbLogger(project="tiny-transformer", save_dir=folder,
                                       offline=cfg.data.offline or None))
        elif name == "mlflow":
            from pytorch_lightning.loggers import MLFlowLogger

            loggers.append(MLFlowLogger(experiment_name="tiny-transformer",
                                        tracking_uri="file:" + os.path.join(os.path.abspath(folder), "mlruns")))
    return loggers


def logged_rows(metrics_csv: str, up_to_step: int) -> list[dict]:
    """The rows of an earlier metrics.csv up to a step, as numbers: a resumed run logs them again (Lightning's
    CSV logger starts a fresh file), and drops what an interrupted run logged after its checkpoint."""
    from plots import read_metrics

    if not os.path.isfile(metrics_csv):
        return []
    return [row for row in read_metrics(metrics_csv) if row["step"] <= up_to_step]


def draw_loss_curve(folder: str, title: str) -> None:
    """loss_curve.png next to metrics.csv (plots.py). A failed picture must never stop a training run."""
    from plots import plot_loss_curve

    try:
        plot_loss_curve(os.path.join(folder, "metrics.csv"), os.path.join(folder, "loss_curve.png"), title)
    except Exception as e:  # noqa: BLE001  (say it, keep training)
        print(f"warning: could not draw loss_curve.png: {type(e).__name__}: {e}", flush=True)
