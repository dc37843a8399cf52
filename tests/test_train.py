"""train.py: LR schedule, optimizer groups, checkpoint cadence and contents, resume, clipping, the smoke run."""

import csv
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

import train
from checkpoint import load_checkpoint, model_state_dict, read_meta
from config import Training, UsageError
from conftest import run_script, write_config


def test_warmup_cosine_schedule_values():
    t = Training(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [train.lr_multiplier(s, t) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up over 10 steps
    assert train.lr_multiplier(10, t) == 1.0  # peak right after warm-up
    assert train.lr_multiplier(55, t) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert train.lr_multiplier(100, t) == pytest.approx(0.1)  # ends at min_lr_ratio
    assert train.lr_multiplier(500, t) == pytest.approx(0.1)  # and stays there


def test_plateau_schedule_is_flat_after_warmup():
    t = Training(max_steps=100, warmup_ratio=0.1, lr_schedule="plateau")
    assert train.lr_multiplier(4, t) == 0.5 and train.lr_multiplier(99, t) == 1.0


def test_weight_decay_only_on_matrices():
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32))
    decay, no_decay = train.adamw(model, Training(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])  # RMSNorm gains


def test_checkpoint_cadence_and_contents(tiny_run):
    """save_every=2, max_steps=6, keep_last=2: steps 4 and 6 stay, step 2 was pruned; last/best/final exist."""
    names = sorted(p.name for p in tiny_run.glob("*.ckpt"))
    assert names == ["best.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "final.ckpt", "last.ckpt"]
    assert (tiny_run / "last.ckpt").stat().st_ino == (tiny_run / "final.ckpt").stat().st_ino  # last follows saves
    final = load_checkpoint(str(tiny_run / "final.ckpt"))
    meta = final["meta"]
    assert meta["kind"] == "pretrain" and meta["step"] == 6 and meta["tokenizer"] == "gpt2"
    assert meta["tokens_seen"] == 6 * 4 * 32  # steps x micro batch x seq_len
    assert meta["config"]["training"]["max_steps"] == 6 and meta["model_config"]["d_model"] == 32
    assert math.isfinite(meta["train_loss"]) and math.isfinite(meta["val_loss"])
    assert "optimizer_states" in final  # enough to resume
    assert read_meta(str(tiny_run / "final.ckpt")) == json.loads(json.dumps(meta))  # the sidecar agrees
    with open(tiny_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["train_loss"]] == ["2", "4", "6"]
    assert [r["step"] for r in rows if r["val_loss"]] == ["3", "6"]


def crash_at_step(monkeypatch, step):
    """Make training die (like a killed process, no clean-up) once `step` optimizer steps are done."""
    original = train.TrainingLog.on_train_batch_end

    def crashing(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == step:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(train.TrainingLog, "on_train_batch_end", crashing)


def weights(folder):
    return model_state_dict(load_checkpoint(str(folder / "checkpoints" / "final.ckpt")))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = {"training": {"max_steps": 8, "val_every": 4}}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    assert train.main(["--config", str(write_config(straight, settings))]) == 0

    config = write_config(crashed, settings)
    with monkeypatch.context() as m:
        crash_at_step(m, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(["--config", str(config)])
    assert read_meta(str(crashed / "checkpoints" / "last.ckpt"))["step"] == 4
    assert train.main(["--config", str(config)]) == 0  # the same command resumes from step 4

    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(crashed)[name], tensor, rtol=0, atol=0, msg=name)
    with open(straight / "checkpoints" / "metrics.csv") as f:
        straight_losses = {r["step"]: r["train_loss"] for r in csv.DictReader(f) if r["train_loss"]}
    with open(crashed / "checkpoints" / "metrics.csv") as f:
        crashed_losses = {r["step"]: r["train_loss"] for r in csv.DictReader(f) if r["train_loss"]}
    assert crashed_losses["6"] == straight_losses["6"] and crashed_losses["8"] == straight_losses["8"]


def test_resume_with_more_steps_replans_the_schedule(tiny_run, tmp_path):
    folder = tmp_path / "longer"
    shutil.copytree(tiny_run, folder / "checkpoints")
    config = write_config(folder, {"training": {"max_steps": 10}})
    assert train.main(["--config", str(config)]) == 0
    assert read_meta(str(folder / "checkpoints" / "final.ckpt"))["step"] == 10
    with open(folder / "checkpoints" / "metrics.csv") as f:
        lr_at_8 = float(next(r["lr"] for r in csv.DictReader(f) if r["step"] == "8" and r["lr"]))
    t = Training(max_steps=10, warmup_ratio=0.2, lr=3e-3)
    assert lr_at_8 == pytest.approx(3e-3 * train.lr_multiplier(8, t), rel=1e-3)  # the NEW schedule


def test_incompatible_checkpoint_stops_with_a_message(tiny_run, tmp_path):
    folder = tmp_path / "wider"
    shutil.copytree(tiny_run, folder / "checkpoints")
    config = write_config(folder, {"model": {"d_model": 64}})
    with pytest.raises(UsageError, match="model.d_model is 32, the config says 64.*--no_resume"):
        train.main(["--config", str(config)])


def test_gradient_clipping_is_always_applied(tmp_path, monkeypatch):
    """The gradient norm the optimizer sees never exceeds training.grad_clip."""
    norms = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, closure, **kwargs):
        def measured_closure():  # Lightning computes and clips the gradients inside the closure
            loss = closure()
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return loss
        return original_step(self, measured_closure, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = write_config(tmp_path, {"training": {"max_steps": 3, "grad_clip": 0.01}})
    assert train.main(["--config", str(config)]) == 0
    assert len(norms) == 3 and max(norms) <= 0.01 * 1.0001


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_run, folder / "checkpoints")
    good = (folder / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(train.LanguageModel, "loss", lambda self, batch: torch.tensor(float("nan"), requires_grad=True))
    assert train.main(["--config", str(write_config(folder, {"training": {"max_steps": 10}}))]) == 1
    assert "loss became nan at step 6" in capsys.readouterr().err
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == good


def test_smoke_run_end_to_end_through_the_cli(tmp_path):
    """The README's two commands: train the smoke config, then sample from it."""
    folder = tmp_path / "smoke"
    result = run_script("train.py", "--config", "config_smoke.yaml", "--set", f"training.checkpoint_dir={folder}")
    assert "starting from scratch" in result.stdout and "done:" in result.stdout
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    val_losses = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert train_losses[-1] < train_losses[0] - 3  # clearly falling (from ~ln(50257) = 10.8)
    assert val_losses[-1] < math.log(50257) - 2
    sample = run_script("infer.py", "--ckpt", folder / "final.ckpt", "--tokenizer", "gpt2", "--prompt", "Attention is",
                        "--max-new-tokens", "8", "--seed", "0")
    assert sample.stdout.startswith("Attention is") and len(sample.stdout) > len("Attention is")


def test_a_damaged_sidecar_falls_back_to_the_checkpoint(tiny_ckpt, tmp_path):
    copy = tmp_path / "final.ckpt"
    shutil.copyfile(tiny_ckpt, copy)
    (tmp_path / "final.ckpt.json").write_text("{not json")
    assert read_meta(str(copy))["step"] == 6
