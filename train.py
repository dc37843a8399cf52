"""Pretrain the Transformer with PyTorch Lightning: next-token prediction on packed text.

Examples:
    python train.py --config config_smoke.yaml                      # ~50 steps on data/tiny_corpus.txt, < 1 min on CPU
    python train.py --config config_smoke.yaml --set training.max_steps=100   # resumes and re-plans the LR schedule
    python train.py --config config_smoke.yaml --no_resume          # start from scratch
    python train.py --config config.yaml                            # the real recipe: streamed English Wikipedia

Everything goes to `training.checkpoint_dir`: `epoch=E-step=S.ckpt` every `save_every` optimizer
steps (the newest `keep_last` kept), `last.ckpt` (refreshed at every save), `best.ckpt` (lowest
val loss), `final.ckpt` (the end), and `metrics.csv`. Running the same command again resumes.
"""

import argparse
import csv
import glob
import io
import logging
import math
import os
import shlex
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from checkpoint import META_SUFFIX, atomic_write, load_checkpoint, pick_device, read_meta, save_checkpoint
from config import UsageError, load_config, model_config, run_cli
from data import PackedWindows, ShuffledPasses, StridedSampler, load_tokenizer, load_tokens, split_documents
from model import Transformer

import pytorch_lightning as pl  # noqa: E402  (after the light imports: ~5 s)
from pytorch_lightning.plugins.io import TorchCheckpointIO  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # our own start-up lines say what matters
warnings.filterwarnings("ignore", message=".*treespec.*LeafSpec.*")  # Lightning 2.6 on torch 2.13: harmless
# Our sampler resumes mid-run by itself (TextData starts at the restored step), which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer
# ---------------------------------------------------------------------------------------------


def lr_multiplier(step: int, t, elapsed: float = 0.0) -> float:
    """LR at optimizer step `step` as a fraction of training.lr: linear warm-up, then cosine (or flat).

    warmup_cosine: 1/W, 2/W, ... 1 over W = warmup_ratio * max_steps steps, then a half cosine down
    to min_lr_ratio at max_steps. plateau: flat after warm-up; reductions come from validation.

    With training.max_time the same shape is laid over the share of the budget used after `elapsed`
    seconds, p = max((step + 1) / max_steps, elapsed / max_time): warm-up while p < warmup_ratio, then
    the cosine reaches its floor exactly when time (or steps) run out, however fast the machine is.
    """
    if t.max_time:
        used = max((step + 1) / t.max_steps, elapsed / t.max_time)
        if used < t.warmup_ratio:
            return used / t.warmup_ratio
        progress = min(1.0, (used - t.warmup_ratio) / (1 - t.warmup_ratio))
    else:
        warmup = int(t.warmup_ratio * t.max_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
    if t.lr_schedule == "plateau":
        return 1.0
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains or biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


# ---------------------------------------------------------------------------------------------
# The Lightning module
# ---------------------------------------------------------------------------------------------


class LanguageModel(pl.LightningModule):
    """Wraps the Transformer for Lightning: loss, optimizer, schedule and the checkpoint's `meta`.

    Labels equal to -100 are ignored, so the same module trains on packed text (every token
    supervised) and on instruction data (only the responses supervised, see finetune.py).
    """

    def __init__(self, cfg, model_cfg, tokenizer_spec: str, kind: str = "pretrain"):
        super().__init__()
        self.cfg, self.kind, self.tokenizer_spec = cfg, kind, tokenizer_spec
        self.model = Transformer(model_cfg)
        self.tokens_seen = 0  # every input token of every rank (padding included)
        self.supervised_seen = 0  # tokens with a label (not -100): all of them in pretraining, the responses in SFT
        self.plateau_scale = 1.0  # LR factor cut by ReduceOnPlateau (lr_schedule: plateau)
        self.schedule_offset = 0  # steps to subtract when the LR schedule restarts on resume
        # training.max_time: seconds of training before this run (from the checkpoint), the start of this run,
        # and `clock` = seconds used as of the last optimizer step, the same on every rank (the LR depends on it).
        self.time_before, self.run_started, self.clock = 0.0, None, 0.0
        self.peak_flops = None  # measured matmul FLOP/s, set by fit_and_save
        self.validated_at = None  # global step of the last validation (Lightning also validates when told to stop)
        self.last_train_loss = self.last_val_loss = None
        self.tokens_per_epoch = None  # training tokens in one pass over the data, to report epochs

    def forward(self, idx):
        return self.model(idx)

    @staticmethod
    def token_loss(logits, y):
        """Mean cross-entropy over the labelled positions of (B, T, vocab) logits and (B, T) labels."""
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)

    def loss(self, batch):
        return self.token_loss(self.model(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        supervised = int((batch[1] != -100).sum())
        if supervised == 0:  # an SFT batch whose responses were all cut away: nothing to learn, skip the step
            return None
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.global_step}: lower training.lr "
                                     "or use training.precision: 32; the last good checkpoint is kept")
        self.tokens_seen += batch[0].numel() * self.trainer.world_size
        self.supervised_seen += supervised * self.trainer.world_size
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        return loss

    def on_validation_end(self):
        self.validated_at = self.global_step

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        supervised = y != -100
        n = int(supervised.sum())
        if n == 0:
            return
        logits = self.model(x)
        accuracy = (logits.argmax(-1) == y)[supervised].float().mean()
        # Weighted by labelled tokens, so the epoch value is the mean over tokens, not over batches.
        self.log("val_loss", self.token_loss(logits, y), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val_acc", accuracy, on_epoch=True, sync_dist=True, batch_size=n)

    def current_lr_multiplier(self, step: int) -> float:
        t = self.cfg.training
        scale = max(self.plateau_scale, t.reduce_on_plateau.min_lr / t.lr)
        return lr_multiplier(step - self.schedule_offset, t, self.clock) * scale

    def on_train_start(self):
        self.run_started = time.monotonic()

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs of a resumed training included (validation counts too)."""
        return self.time_before + (time.monotonic() - self.run_started if self.run_started else 0.0)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        t = self.cfg.training
        if not t.max_time or (batch_idx + 1) % t.grad_accum_steps:
            return
        # Rank 0's clock for everyone: ranks with different LRs or stopping steps would drift apart or hang.
        self.clock = self.trainer.strategy.broadcast(self.elapsed())
        if self.clock >= t.max_time:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        optimizer = adamw(self.model, self.cfg.training)
        # A plain function of the step: on resume only the step is restored, so a changed max_steps re-plans.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.current_lr_multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["meta"] = {
            "kind": self.kind,
            "step": self.global_step,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
            "supervised_seen": self.supervised_seen,
            "train_loss": self.last_train_loss,
            "val_loss": self.last_val_loss,
            "n_params": self.model.num_parameters(),
            "model_config": vars(self.model.config).copy(),
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer_spec,
            "plateau_scale": self.plateau_scale,
            "schedule_offset": self.schedule_offset,
            "train_time": round(self.elapsed(), 3),
            "matmul_peak_flops": self.peak_flops,  # the yardstick of the MFU figures (fp32, measured at start-up)
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    @property
    def epoch(self) -> float | None:
        """Passes over the training data so far (fractional)."""
        return round(self.tokens_seen / self.tokens_per_epoch, 4) if self.tokens_per_epoch else None

    def on_load_checkpoint(self, checkpoint):
        meta = checkpoint["meta"]
        resume_at_step_boundary(checkpoint, meta["step"] * self.cfg.training.grad_accum_steps)
        self.tokens_seen = meta["tokens_seen"]
        self.supervised_seen = meta.get("supervised_seen", meta["tokens_seen"])
        self.last_train_loss, self.last_val_loss = meta["train_loss"], meta["val_loss"]
        self.plateau_scale = meta.get("plateau_scale", 1.0)
        self.schedule_offset = meta["step"] if self.cfg.training.reset_lr_on_resume else meta.get("schedule_offset", 0)
        # The time budget (training.max_time) goes on from where it stood, or restarts with the schedule.
        self.time_before = 0.0 if self.cfg.training.reset_lr_on_resume else meta.get("train_time", 0.0)
        self.clock = self.time_before
        # Re-plan: the restored optimizer must start from the NEW schedule's LR, not the one it was saved with.
        lr = self.cfg.training.lr * self.current_lr_multiplier(meta["step"])
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                group["lr"], group["initial_lr"] = lr, self.cfg.training.lr
        for state in checkpoint.get("lr_schedulers", []):
            state["base_lrs"] = [self.cfg.training.lr] * len(state["base_lrs"])
            state["_last_lr"] = [lr] * len(state["_last_lr"])


def resume_at_step_boundary(checkpoint: dict, micro_batches: int) -> None:
    """Make Lightning resume as if the checkpoint were saved right after optimizer step `meta.step`.

    TextData restarts its sampler at the saved step by itself, so Lightning must not also fast-forward
    from its own batch counters. Those counters differ with the moment of saving (a periodic save in
    on_train_batch_end is one batch "unfinished", best.ckpt after validation is not, a Ctrl-C save may
    fall mid-accumulation or mid-validation), and a mismatch makes Lightning end its epoch early and
    replay data. Here every checkpoint gets the same state: `micro_batches` (= step x grad_accum_steps)
    batches fully done, none yet in this run's "epoch" (the sampler holds only the remaining batches),
    and no validation in progress. Accumulation, which counts this epoch's batches, stays aligned;
    validation, which counts all batches, keeps its schedule (one due at that very step is skipped).
    """
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not loops:
        return
    batches = loops["epoch_loop.batch_progress"]
    batches["total"].update(ready=micro_batches, started=micro_batches, processed=micro_batches,
                            completed=micro_batches)
    batches["current"].update(ready=0, started=0, processed=0, completed=0)
    batches["is_last_batch"] = False
    for counters in loops["epoch_loop.val_loop.batch_progress"].values():
        if isinstance(counters, dict):  # not mid-validation: every started batch counts as completed
            n = counters["completed"]
            counters.update(ready=n, started=n, processed=n)


class TextData(pl.LightningDataModule):
    """Training samples in a seeded order that resumes mid-run, sharded once across ranks.

    Samples are packed windows (pretraining) or instruction examples of varying length, which
    finetune.py batches with its own `collate_fn` (padding each batch to its longest example).
    """

    def __init__(self, train_windows, val_windows, t, num_workers: int = 0, start_step: int = 0, collate_fn=None):
        super().__init__()
        self.train_windows, self.val_windows, self.t = train_windows, val_windows, t
        self.num_workers, self.start_step, self.collate_fn = num_workers, start_step, collate_fn

    def _loader(self, dataset, sampler, workers, drop_last):
        return torch.utils.data.DataLoader(dataset, batch_size=self.t.micro_batch_size, sampler=sampler,
                                           num_workers=workers, drop_last=drop_last, persistent_workers=workers > 0,
                                           collate_fn=self.collate_fn)

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        per_step = self.t.micro_batch_size * self.t.grad_accum_steps * world  # samples per optimizer step
        sampler = StridedSampler(self.start_step * per_step, self.t.max_steps * per_step, rank, world)
        dataset = ShuffledPasses(self.train_windows, self.t.seed)
        return self._loader(dataset, sampler, self.num_workers, drop_last=True)

    def val_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        n = min(len(self.val_windows), self.t.val_batches * self.t.micro_batch_size * world)
        return self._loader(self.val_windows, StridedSampler(0, n, rank, world), 0, drop_last=False)


# ---------------------------------------------------------------------------------------------
# Checkpoints, logging and metrics
# ---------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning writes every checkpoint through here: temporary file + fsync + rename, plus the JSON sidecar."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_checkpoint(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint(str(path), mmap=False)


def link_atomically(src: str, dst: str) -> None:
    """Make dst the same file as src (a hard link, no copy), replacing dst atomically."""
    for suffix in ("", META_SUFFIX):
        tmp = f"{dst}{suffix}.tmp{os.getpid()}"
        try:
            os.link(src + suffix, tmp)
        except OSError:  # file systems without hard links
            import shutil

            shutil.copyfile(src + suffix, tmp)
        os.replace(tmp, dst + suffix)


def periodic_checkpoints(folder: str) -> list[str]:
    """Periodic checkpoints (epoch=E-step=S.ckpt), oldest step first."""
    paths = glob.glob(os.path.join(folder, "epoch=*-step=*.ckpt"))
    return sorted(paths, key=lambda p: int(p.rsplit("step=", 1)[1].split(".")[0]))


class Checkpoints(pl.Callback):
    """Periodic, last, best and final checkpoints, on optimizer-step boundaries."""

    def __init__(self, t):
        self.t, self.folder = t, t.checkpoint_dir
        self.best = math.inf
        self.counts_at_step = None  # (tokens_seen, supervised_seen) at the last optimizer step
        self.save_pending = False  # a periodic save waiting for this step's validation

    def save(self, trainer, name: str) -> str:
        path = os.path.join(self.folder, name)
        trainer.save_checkpoint(path, weights_only=False)  # only rank 0 writes; optimizer included for resume
        if trainer.is_global_zero and name != "last.ckpt":
            link_atomically(path, os.path.join(self.folder, "last.ckpt"))
        return path

    def on_train_start(self, trainer, module):
        self.counts_at_step = (module.tokens_seen, module.supervised_seen)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.t.grad_accum_steps:
            return  # not the end of an optimizer step
        self.counts_at_step = (module.tokens_seen, module.supervised_seen)  # what an interrupted save records
        if trainer.global_step % self.t.save_every:
            return
        if trainer.global_step % self.t.val_every == 0:
            self.save_pending = True  # validation runs right after this step: save then, with its val loss
            return
        self.save_periodic(trainer, module)

    def save_periodic(self, trainer, module):
        """epoch=E-step=S.ckpt (E: whole passes over the data), then prune to the newest keep_last."""
        self.save_pending = False
        self.save(trainer, f"epoch={int(module.epoch or 0)}-step={trainer.global_step}.ckpt")
        if trainer.is_global_zero and self.t.keep_last:
            for old in periodic_checkpoints(self.folder)[:-self.t.keep_last]:
                for path in (old, old + META_SUFFIX):
                    if os.path.exists(path):
                        os.remove(path)

    def on_validation_end(self, trainer, module):
        val = trainer.callback_metrics.get("val_loss")
        if val is None or trainer.sanity_checking:
            return
        module.last_val_loss = float(val)
        if float(val) < self.best:
            self.best = float(val)
            trainer.save_checkpoint(os.path.join(self.folder, "best.ckpt"), weights_only=False)
        if self.save_pending:
            self.save_periodic(trainer, module)

    def on_train_end(self, trainer, module):
        if self.save_pending:  # the validation it waited for did not come
            self.save_periodic(trainer, module)

    def on_exception(self, trainer, module, exception):
        """Ctrl-C: save where training stands (rank 0 only, no collective call) and say how to resume.

        Lightning calls this before it exits. A checkpoint taken in the middle of gradient accumulation
        holds the weights of the last optimizer step: the half-accumulated gradients are dropped, the
        resumed run redoes that step from its first micro-batch (the sampler starts at global_step), and
        the token counters are rolled back to that step so they are not counted twice.
        """
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        if trainer.global_step == 0 or trainer.strategy.__class__.__name__.startswith("FSDP"):
            print("interrupted before a checkpoint could be saved here; run the same command to resume from "
                  "the newest checkpoint (if any)", file=sys.stderr, flush=True)
            return
        if self.counts_at_step:
            module.tokens_seen, module.supervised_seen = self.counts_at_step
        path = os.path.join(self.folder, f"epoch={int(module.epoch or 0)}-step={trainer.global_step}.ckpt")
        # trainer.save_checkpoint would wait at a barrier for the other ranks, which may be gone already.
        save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(weights_only=False), path)
        link_atomically(path, os.path.join(self.folder, "last.ckpt"))
        print(f"interrupted at step {trainer.global_step}: saved {path}; to resume, run the same command again: "
              f"python {shlex.join(sys.argv)}", file=sys.stderr, flush=True)

    def state_dict(self):
        return {"best": self.best}  # so that a resumed run replaces best.ckpt only with a better one

    def load_state_dict(self, state):
        self.best = state["best"]


class Plateau(pl.Callback):
    """Acts when val loss stops improving: cuts the LR (lr_schedule: plateau) and stops early (early_stopping).

    Both count the same thing: validations since val loss last beat its best by more than
    early_stopping.min_delta. An LR cut does not reset that count (a cut that does not help must
    still lead to stopping), and it lasts: it multiplies module.plateau_scale, which the LR schedule
    itself multiplies in at every step, so the schedule cannot undo it.
    """

    def __init__(self, t):
        self.t = t
        self.best = math.inf
        self.stale = 0  # validations without improvement (early stopping)
        self.stale_since_cut = 0  # the same, counted since the last LR cut (plateau reduction)

    def on_validation_end(self, trainer, module):
        val = trainer.callback_metrics.get("val_loss")
        if val is None or trainer.sanity_checking:
            return
        if float(val) < self.best - self.t.early_stopping.min_delta:
            self.best, self.stale, self.stale_since_cut = float(val), 0, 0
            return
        self.stale += 1
        self.stale_since_cut += 1
        plateau = self.t.reduce_on_plateau
        if self.t.lr_schedule == "plateau" and self.stale_since_cut >= plateau.patience:
            module.plateau_scale *= plateau.factor
            self.stale_since_cut = 0
            lr = self.t.lr * module.current_lr_multiplier(trainer.global_step)
            for group in trainer.optimizers[0].param_groups:  # effective now, not only after the next step
                group["lr"] = lr
            if trainer.is_global_zero:
                print(f"step {trainer.global_step}: val loss has not improved for {plateau.patience} validations, "
                      f"LR cut to {lr:.2e}", flush=True)
        if self.t.early_stopping.enabled and self.stale >= self.t.early_stopping.patience:
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"step {trainer.global_step}: early stopping, val loss has not improved for {self.stale} "
                      f"validations (best {self.best:.4f})", flush=True)

    def state_dict(self):
        return {"best": self.best, "stale": self.stale, "stale_since_cut": self.stale_since_cut}

    def load_state_dict(self, state):
        self.best, self.stale, self.stale_since_cut = state["best"], state["stale"], state["stale_since_cut"]


class TrainingLog(pl.Callback):
    """A log line every `log_every` steps (step, loss, lr, tokens/s, MFU, ETA) and rows in metrics.csv."""

    FIELDS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s",
              "val_acc", "supervised_tokens_per_s"]

    def __init__(self, t, flops_per_token: float, peak_flops: float):
        self.t, self.flops_per_token, self.peak_flops = t, flops_per_token, peak_flops
        self.csv_path = os.path.join(t.checkpoint_dir, "metrics.csv")
        self.losses, self.window_start = [], None

    def write_row(self, **row):
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in self.FIELDS})

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero and os.path.exists(self.csv_path):
            self.drop_rows_after(trainer.global_step)
        self.start = self.window_start = time.time()
        self.window_tokens, self.start_step = module.tokens_seen, trainer.global_step
        self.window_supervised = module.supervised_seen

    def drop_rows_after(self, step: int) -> None:
        """On resume, forget what an interrupted run logged after its checkpoint: those steps run again."""
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) <= step]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.csv_path, lambda f: f.write(text.getvalue().encode()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs:  # None when training_step skipped the batch
            # Lightning hands back the loss divided by accumulate_grad_batches (what backward saw): undo that.
            self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
        step = trainer.global_step
        if (batch_idx + 1) % self.t.grad_accum_steps or step % self.t.log_every and step != self.t.max_steps:
            return
        now = time.time()
        loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        if trainer.world_size > 1:  # every rank gets here at the same step: report the whole global batch's loss
            loss = float(trainer.strategy.reduce(torch.tensor(loss, device=module.device), reduce_op="mean"))
        tok_s = (module.tokens_seen - self.window_tokens) / max(now - self.window_start, 1e-9)
        sup_s = (module.supervised_seen - self.window_supervised) / max(now - self.window_start, 1e-9)
        mfu = tok_s * self.flops_per_token / self.peak_flops / trainer.world_size
        eta = (now - self.start) / max(step - self.start_step, 1) * (self.t.max_steps - step)
        if self.t.max_time:  # the time budget may end the run first
            eta = min(eta, max(0.0, self.t.max_time - module.clock))
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        module.last_train_loss = loss
        if trainer.is_global_zero:
            # SFT: tok/s counts every position computed (padding included), supervised tok/s the trained-on ones.
            supervised = f"{sup_s:,.0f} supervised tok/s | " if module.kind == "sft" else ""
            print(f"step {step}/{self.t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                  f"{supervised}MFU {100 * mfu:.1f}% | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
            self.write_row(step=step, epoch=module.epoch, tokens_seen=module.tokens_seen, train_loss=f"{loss:.5f}",
                           lr=f"{lr:.4e}", tokens_per_s=f"{tok_s:.1f}", elapsed_s=f"{now - self.start:.1f}",
                           supervised_tokens_per_s=f"{sup_s:.1f}")
        self.losses, self.window_start, self.window_tokens = [], now, module.tokens_seen
        self.window_supervised = module.supervised_seen

    def on_validation_end(self, trainer, module):
        val = trainer.callback_metrics.get("val_loss")
        if val is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        acc = float(trainer.callback_metrics.get("val_acc", math.nan))  # share of labelled tokens predicted top-1
        print(f"step {trainer.global_step}/{self.t.max_steps} | val_loss {float(val):.4f} | "
              f"val_ppl {math.exp(min(float(val), 50)):.2f} | val_acc {acc:.3f}", flush=True)
        self.write_row(step=trainer.global_step, epoch=module.epoch, tokens_seen=module.tokens_seen,
                       val_loss=f"{float(val):.5f}", elapsed_s=f"{time.time() - self.start:.1f}", val_acc=f"{acc:.4f}")
        self.draw_loss_curve(f"{module.kind} loss")  # the last validation comes after the last step: also "at the end"

    def draw_loss_curve(self, title: str) -> None:
        """loss_curve.png next to metrics.csv (plots.py). A failed picture must never stop a training run."""
        from plots import plot_loss_curve

        try:
            plot_loss_curve(self.csv_path, os.path.join(os.path.dirname(self.csv_path), "loss_curve.png"), title)
        except Exception as e:  # noqa: BLE001  (say it, keep training)
            print(f"warning: could not draw loss_curve.png: {type(e).__name__}: {e}", flush=True)


# ---------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------


def matmul_peak_flops(device: torch.device, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Measured FLOP/s of a square matmul: the yardstick for model FLOPs utilisation (MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def choose_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """(Lightning precision, reason). auto: bf16 autocast where the hardware computes bf16 natively."""
    if setting != "auto":
        return setting, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "auto: this GPU supports bfloat16"
        return "16-mixed", "auto: this GPU lacks bfloat16, using float16 with loss scaling"
    if device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "bf16-mixed", "auto: this CPU has AVX512-BF16, bf16 matmuls run ~2x faster than fp32"
    return "32", f"auto: no fast half precision on {device.type}"


def find_resume_checkpoint(folder: str, model_cfg, tokenizer_spec: str, kind: str):
    """The newest checkpoint in `folder` (not its subfolders) to resume from, or None.

    A checkpoint of another architecture, tokenizer or kind stops the run with a message instead of
    being silently ignored.
    """
    candidates = []
    for path in glob.glob(os.path.join(folder, "*.ckpt")):
        meta = read_meta(path)
        candidates.append((meta["step"], os.path.getmtime(path), path, meta))
    if not candidates:
        return None
    step, _, path, meta = max(candidates, key=lambda c: (c[0], c[1]))
    theirs, ours = meta["model_config"], vars(model_cfg)
    ignore = {"dropout", "gradient_checkpointing"}  # safe to change between runs
    for key in ours:
        if key not in ignore and theirs.get(key) != ours[key]:
            raise UsageError(f"cannot resume from {path}: its model.{key} is {theirs.get(key)}, the config says "
                             f"{ours[key]}; pass --no_resume to start over or set training.checkpoint_dir elsewhere")
    if meta.get("tokenizer") != tokenizer_spec or meta.get("kind") != kind:
        raise UsageError(f"cannot resume from {path}: it is a {meta.get('kind')} checkpoint with tokenizer "
                         f"{meta.get('tokenizer')!r}; pass --no_resume or set training.checkpoint_dir elsewhere")
    return path, meta


def build_trainer(cfg, callbacks, device: torch.device, precision: str) -> pl.Trainer:
    t, hw = cfg.training, cfg.hardware
    return pl.Trainer(
        accelerator=device.type if device.type != "cuda" else "gpu",
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy=hw.strategy,
        precision=precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.grad_accum_steps,
        gradient_clip_val=t.grad_clip or None,
        val_check_interval=t.val_every * t.grad_accum_steps,  # counted in micro-batches
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # data.StridedSampler already shards by rank
        logger=False,
        enable_checkpointing=False,  # the Checkpoints callback owns checkpointing
        enable_model_summary=False,
        enable_progress_bar=sys.stdout.isatty(),
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see docs/CONFIG_REFERENCE.md)")
    parser.add_argument("--no_resume", "--no-resume", action="store_true",
                        help="ignore checkpoints in training.checkpoint_dir and start from scratch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.lr=1e-3 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    t = cfg.training
    device = pick_device(cfg.hardware.accelerator, strict=False)
    precision, why = choose_precision(t.precision, device)
    pl.seed_everything(t.seed, verbose=False)

    tokenizer = load_tokenizer(cfg.data.tokenizer_name, cfg.data.offline)
    vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)  # padded: matmuls run faster on multiples of 64
    model_cfg = model_config(cfg, vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens: remove model.vocab_size to size it automatically")

    resume = None if args.no_resume or not t.auto_resume else find_resume_checkpoint(
        t.checkpoint_dir, model_cfg, tokenizer.spec, "pretrain")
    if already_done(resume, t):
        return 0

    train_docs, val_docs, held_out = split_documents(cfg.data)
    train_tokens = load_tokens(train_docs, tokenizer, cfg.data, "train")  # cached in data.cache_dir
    val_tokens = load_tokens(val_docs, tokenizer, cfg.data, "val")
    train_windows, val_windows = PackedWindows(train_tokens, t.seq_len), PackedWindows(val_tokens, t.seq_len)
    if len(train_windows) == 0 or len(val_windows) == 0:
        which = "training" if len(train_windows) == 0 else "validation"
        raise UsageError(f"the {which} text has fewer than seq_len+1 = {t.seq_len + 1} tokens: "
                         "add text, lower training.seq_len, or adjust data.val_docs")

    os.makedirs(t.checkpoint_dir, exist_ok=True)
    module = LanguageModel(cfg, model_cfg, tokenizer.spec)
    module.tokens_per_epoch = len(train_windows) * t.seq_len
    data = TextData(train_windows, val_windows, t, cfg.hardware.num_workers, resume[1]["step"] if resume else 0)

    def plan(world_size):
        tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum_steps * world_size
        return [f"data: {len(train_tokens):,} train tokens ({len(train_windows):,} windows), "
                f"{len(val_tokens):,} val tokens; {held_out}",
                f"batch: {tokens_per_step:,} tokens per optimizer step = {t.micro_batch_size} seqs x {t.seq_len} "
                f"tokens x {t.grad_accum_steps} accum x {world_size} devices; {t.max_steps} steps = "
                f"{t.max_steps * tokens_per_step / max(len(train_tokens), 1):.2f} epochs",
                f"resuming from {resume[0]} at step {resume[1]['step']}" if resume else "starting from scratch"]

    final = os.path.join(t.checkpoint_dir, "final.ckpt")
    return fit_and_save(cfg, module, data, device, precision, why, resume, plan,
                        f"python infer.py --ckpt {final} --prompt \"Attention is\"")


def already_done(resume, t) -> bool:
    """True, and says so, when the checkpoint to resume from has already reached training.max_steps."""
    if resume and resume[1]["step"] >= t.max_steps:
        print(f"{resume[0]} is already at step {resume[1]['step']} of training.max_steps={t.max_steps}: "
              "nothing to do (raise max_steps to train longer, or pass --no_resume)")
        return True
    if resume and t.max_time and not t.reset_lr_on_resume and resume[1].get("train_time", 0.0) >= t.max_time:
        print(f"{resume[0]} has already trained {resume[1]['train_time']:.0f} s of training.max_time={t.max_time:g}: "
              "nothing to do (raise max_time to train longer, or pass --no_resume)")
        return True
    return False


def fit_and_save(cfg, module, data, device, precision, why, resume, plan, next_command) -> int:
    """What train.py and finetune.py share: the Trainer, start-up lines, fit, a final validation, final.ckpt.

    `plan(world_size)` returns the lines that describe the data, the batches and the starting point;
    `next_command` is suggested at the end. Returns the exit code.
    """
    t = cfg.training
    flops = module.model.flops_per_token(t.seq_len)
    peak = module.peak_flops = matmul_peak_flops(device)
    if t.compile:
        module.model.compile()  # in place, so parameter names (and checkpoints) stay those of the plain model
    # TrainingLog first: a checkpoint's meta then holds this step's train loss, and metrics.csv has the
    # step's row before a save that a kill could interrupt.
    trainer = build_trainer(cfg, [TrainingLog(t, flops, peak), Checkpoints(t), Plateau(t)], device, precision)
    if trainer.is_global_zero:
        print(f"model: {module.model.num_parameters():,} parameters "
              f"({module.model.num_parameters(exclude_embeddings=True):,} without embeddings), "
              f"{flops / 1e6:.1f} MFLOPs/token (fwd+bwd)")
        print("\n".join(plan(trainer.world_size)))
        print(f"device: {device.type} x {trainer.world_size}, precision {precision} ({why}); "
              f"matmul peak {peak / 1e9:.0f} GFLOP/s (fp32, measured; MFU is against it"
              f"{', even in half precision' if precision != '32' else ''})")
        if t.max_time:
            print(f"time budget: {t.max_time:g} s of training (training.max_time); the LR schedule follows the clock")
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume[0] if resume else None)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit:  # Lightning exits this way after Ctrl-C (Checkpoints.on_exception has saved)
        if trainer.interrupted:
            return 130
        raise
    if trainer.interrupted:
        return 130
    if module.validated_at != trainer.global_step:  # validate the final weights unless the last step just did
        trainer.validate(module, datamodule=data, verbose=False)
    Checkpoints(t).save(trainer, "final.ckpt")
    if trainer.is_global_zero:
        print(f"done: {os.path.join(t.checkpoint_dir, 'final.ckpt')} (val_loss {module.last_val_loss:.4f}); "
              f"try: {next_command}")
    return 0


if __name__ == "__main__":
    run_cli(main)
