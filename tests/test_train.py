"""train.py and training.py: LR schedule, optimizer groups, checkpoint cadence and contents, resume, clipping,
non-finite losses, loggers. (The smoke run itself, README's two commands, runs in tests/test_docs.py, whose
figures it checks.)"""

import ast
import csv
import json
import math
import re
import shutil

import pytest
import torch

import train
import training
from checkpoint import load_checkpoint, read_meta
from cli import UsageError
from config import Training
from tokenizer import load_tokenizer
from conftest import ROOT, run_script, write_config


def test_warmup_cosine_schedule_values():
    t = Training(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [training.lr_multiplier(s, t) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up over 10 steps
    assert training.lr_multiplier(10, t) == 1.0  # peak right after warm-up
    assert training.lr_multiplier(55, t) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert training.lr_multiplier(100, t) == pytest.approx(0.1)  # ends at min_lr_ratio
    assert training.lr_multiplier(500, t) == pytest.approx(0.1)  # and stays there


def test_wsd_schedule_is_flat_then_falls_linearly_in_the_cooldown():
    t = Training(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.0, lr_schedule="wsd", cooldown_ratio=0.2)
    assert training.lr_multiplier(4, t) == 0.5 and training.lr_multiplier(10, t) == 1.0
    assert training.lr_multiplier(81, t) == 1.0  # progress 71/90 < 0.8: still stable
    assert training.lr_multiplier(91, t) == pytest.approx(0.5)  # half-way through the cool-down
    assert training.lr_multiplier(100, t) == pytest.approx(0.0)


def test_plateau_schedule_is_flat_after_warmup_and_follows_the_plateau_scale():
    t = Training(max_steps=100, warmup_ratio=0.1, lr_schedule="plateau", lr=1e-3)
    assert training.lr_multiplier(4, t) == 0.5 and training.lr_multiplier(99, t) == 1.0
    assert training.lr_multiplier(50, t, plateau_scale=0.25) == 0.25
    assert training.lr_multiplier(50, t, plateau_scale=1e-9) == pytest.approx(1e-6 / 1e-3)  # reduce_on_plateau.min_lr


def test_weight_decay_only_on_matrices():
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32))
    optimizers, peak_lrs = training.make_optimizers(model, Training(weight_decay=0.1, lr=2e-3))
    decay, no_decay = optimizers["adamw"].param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])  # RMSNorm gains
    assert peak_lrs == {"adamw": [2e-3, 2e-3]}


def test_token_loss_is_the_mean_over_labelled_positions_and_zero_without_labels():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(training.token_loss(logits, labels), expected)
    none = training.token_loss(logits, torch.full_like(labels, -100))  # e.g. an SFT batch whose responses were cut
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


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
    # final (and best): the weights and the tokenizer itself (enough to use it anywhere), no training state
    assert set(final) == {"state_dict", "tokenizer", "meta"} and "train_state" not in meta
    assert "train_state" not in load_checkpoint(str(tiny_run / "best.ckpt"))["meta"]
    # the periodic ones add the optimizer and random state (enough to resume)
    resumable = load_checkpoint(str(tiny_run / "epoch=0-step=6.ckpt"))
    assert set(resumable) == {"state_dict", "adamw", "rng", "tokenizer", "meta"}
    train_state = resumable["meta"]["train_state"]
    assert train_state["step"] == 6 and train_state["best_val_loss"] <= meta["val_loss"]
    for name, tensor in final["state_dict"].items():
        assert torch.equal(resumable["state_dict"][name], tensor), name
    # AdamW's two moments are two more copies of the weights: the weights-only file is about a third
    assert (tiny_run / "final.ckpt").stat().st_size < 0.45 * (tiny_run / "epoch=0-step=6.ckpt").stat().st_size
    assert meta["tokenizer_sha256"] == load_tokenizer("gpt2").sha256
    assert read_meta(str(tiny_run / "final.ckpt")) == json.loads(json.dumps(meta))  # the sidecar agrees
    with open(tiny_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["train_loss"]] == ["2", "4", "6"]
    assert [r["step"] for r in rows if r["val_loss"]] == ["3", "6"]
    assert {"tokens_seen", "lr", "tokens_per_s", "mfu", "val_ppl", "val_acc", "elapsed_s"} <= set(rows[0])


def crash_at_step(monkeypatch, step):
    """Make training die (like a killed process: no clean-up, no checkpoint) when it starts optimizer step `step`."""
    original = training.lr_multiplier

    def crashing(s, *args, **kwargs):
        if s == step:
            raise RuntimeError("simulated crash")
        return original(s, *args, **kwargs)
    monkeypatch.setattr(training, "lr_multiplier", crashing)


def weights(folder):
    return load_checkpoint(str(folder / "checkpoints" / "final.ckpt"))["state_dict"]


def train_losses(folder) -> dict:
    with open(folder / "metrics.csv") as f:
        return {r["step"]: r["train_loss"] for r in csv.DictReader(f) if r["train_loss"]}


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = {"training": {"max_steps": 8, "val_every": 4, "log_every": 1}, "model": {"dropout": 0.1}}
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

    for name, tensor in weights(straight).items():  # dropout too: the random state is restored
        torch.testing.assert_close(weights(crashed)[name], tensor, rtol=0, atol=0, msg=name)
    straight_losses, crashed_losses = train_losses(straight / "checkpoints"), train_losses(crashed / "checkpoints")
    assert crashed_losses == straight_losses and len(straight_losses) == 8  # one row per step, the same losses


def test_resume_with_more_steps_replans_the_schedule(tiny_run, tmp_path):
    folder = tmp_path / "longer"
    shutil.copytree(tiny_run, folder / "checkpoints")
    config = write_config(folder, {"training": {"max_steps": 10}})
    assert train.main(["--config", str(config)]) == 0
    assert read_meta(str(folder / "checkpoints" / "final.ckpt"))["step"] == 10
    with open(folder / "checkpoints" / "metrics.csv") as f:
        lr_at_8 = float(next(r["lr"] for r in csv.DictReader(f) if r["step"] == "8" and r["lr"]))
    t = Training(max_steps=10, warmup_ratio=0.2, lr=3e-3)
    assert lr_at_8 == pytest.approx(3e-3 * training.lr_multiplier(7, t), rel=1e-6)  # step 8 = index 7, NEW schedule


def test_a_finished_run_keeps_a_checkpoint_to_resume_from_and_says_the_sizes(tmp_path, capsys):
    """save_every does not divide max_steps: the end still writes a resumable epoch=E-step=S.ckpt beside the
    weights-only final.ckpt, so raising max_steps continues exactly where the run ended."""
    config = write_config(tmp_path, {"training": {"max_steps": 5, "save_every": 3}})
    assert train.main(["--config", str(config)]) == 0
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("epoch=*.ckpt")) == ["epoch=0-step=3.ckpt", "epoch=0-step=5.ckpt"]
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done:"))
    sizes = re.search(r"final\.ckpt \((\S+) MB, weights only; epoch=0-step=5\.ckpt, (\S+) MB, adds the optimizer", done)
    assert sizes, done
    assert float(sizes[1]) == pytest.approx((folder / "final.ckpt").stat().st_size / 1e6, abs=0.05)
    assert float(sizes[2]) == pytest.approx((folder / "epoch=0-step=5.ckpt").stat().st_size / 1e6, abs=0.05)
    assert train.main(["--config", str(config), "--set", "training.max_steps=7"]) == 0
    assert "resuming from" in capsys.readouterr().out and read_meta(str(folder / "final.ckpt"))["step"] == 7


def test_only_weights_left_is_refused_as_a_resume_point(tiny_run, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("final.ckpt", "final.ckpt.json"):
        shutil.copy(tiny_run / name, folder / name)
    with pytest.raises(UsageError, match="final.ckpt: it holds no training state"):
        train.main(["--config", str(write_config(tmp_path, {"training": {"max_steps": 8}}))])


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

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return original_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = write_config(tmp_path, {"training": {"max_steps": 3, "grad_clip": 0.01}})
    assert train.main(["--config", str(config)]) == 0
    assert len(norms) == 3 and max(norms) <= 0.01 * 1.0001


def test_muon_clips_one_global_norm_over_both_optimizers(tmp_path, monkeypatch):
    """With training.optimizer muon, AdamW and Muon step different parameters; the clip bounds the norm of ALL
    their gradients together (each optimizer clipped to grad_clip alone would allow sqrt(2) x grad_clip)."""
    squared = {"AdamW": [], "Muon": []}  # per optimizer: the squared norm of its gradients at each of its steps
    for cls in (torch.optim.AdamW, torch.optim.Muon):
        def recording_step(self, *args, _original=cls.step, _name=cls.__name__, **kwargs):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            squared[_name].append(float(sum(g.float().pow(2).sum() for g in grads)))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "step", recording_step)
    config = write_config(tmp_path, {"training": {"max_steps": 3, "grad_clip": 0.01, "optimizer": "muon"}})
    assert train.main(["--config", str(config)]) == 0
    assert len(squared["AdamW"]) == len(squared["Muon"]) == 3
    for adamw, muon in zip(squared["AdamW"], squared["Muon"]):
        assert adamw > 0 and muon > 0
        assert math.sqrt(adamw + muon) <= 0.01 * 1.0001  # one bound for the whole model
    rows = list(csv.DictReader(open(tmp_path / "checkpoints" / "metrics.csv")))
    logged = [float(r["grad_norm"]) for r in rows if r.get("grad_norm")]
    assert logged and all(n > 0.01 for n in logged)  # the norm BEFORE clipping: what says whether a run is healthy


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_run, folder / "checkpoints")
    good = (folder / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(training, "token_loss", lambda logits, labels: logits.float().sum() * float("nan"))
    assert train.main(["--config", str(write_config(folder, {"training": {"max_steps": 10}}))]) == 1
    assert "loss became nan at step 6" in capsys.readouterr().err
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == good


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """Weights that went inf/nan in the optimizer step before a save (the loss was still finite) are not saved."""
    original_step, calls = torch.optim.AdamW.step, []

    def poisoning_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # step 2, which save_every=2 checkpoints
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    assert train.main(["--config", str(write_config(tmp_path, {"training": {"max_steps": 4}}))]) == 1
    assert "the weights became inf/nan by step 2" in capsys.readouterr().err
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_loggers_config_refuses_a_logger_that_is_not_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    config = write_config(tmp_path, {"training": {"loggers": ["csv", "wandb"]}})
    with pytest.raises(UsageError, match="training.loggers: wandb needs the wandb package: pip install wandb"):
        train.main(["--config", str(config)])
    with pytest.raises(UsageError, match=r"training\.loggers\[0\] must be csv, tensorboard, wandb or mlflow, got 'neptune'"):
        train.main(["--config", str(write_config(tmp_path, {"training": {"loggers": ["neptune"]}}))])


def test_without_the_csv_logger_there_is_no_metrics_file(tmp_path):
    assert train.main(["--config", str(write_config(tmp_path, {"training": {"max_steps": 2, "loggers": []}}))]) == 0
    assert (tmp_path / "checkpoints" / "final.ckpt").exists() and not (tmp_path / "checkpoints" / "metrics.csv").exists()


def test_no_private_lightning_state_anywhere():
    """No module reads or writes a `_`-prefixed attribute of a Lightning object, nor imports a private name."""
    offenders = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("benchmarks/*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "lightning" in node.module:
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") or "._" in node.module]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)
                if any(word in owner for word in ("fabric", "trainer", "strategy", "lightning")):
                    offenders.append(f"{path.name}: {owner}.{node.attr}")
    text = "\n".join(p.read_text() for p in ROOT.glob("*.py"))
    for name in ("_checkpoint_connector", "fit_loop", "_last_lr", "base_lrs"):
        if name in text:
            offenders.append(name)
    assert offenders == []


def test_train_py_reads_top_to_bottom_in_run_order():
    """The learner's order: arguments, config, data, model, optimizer, resume, the loop; short enough to read."""
    source = (ROOT / "train.py").read_text()
    assert len(source.splitlines()) <= 350
    body = source[source.index("def main("):]
    steps = ["load_config", "load_tokenizer", "start_fabric", "split_documents", "Transformer(", "make_optimizers",
             "training.restore", "training.fit"]
    positions = [body.index(step) for step in steps]
    assert positions == sorted(positions)
    finetune_source = (ROOT / "finetune.py").read_text()
    assert not re.search(r"^(import train|from train import)\b", finetune_source, re.M)  # the two scripts are peers


def test_a_damaged_sidecar_falls_back_to_the_checkpoint(tiny_ckpt, tmp_path):
    copy = tmp_path / "final.ckpt"
    shutil.copyfile(tiny_ckpt, copy)
    (tmp_path / "final.ckpt.json").write_text("{not json")
    assert read_meta(str(copy))["step"] == 6


def test_fsdp_on_a_cpu_is_refused_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP can run")
    config = write_config(tmp_path, {"hardware": {"strategy": "fsdp"}})
    with pytest.raises(UsageError, match="hardware.strategy fsdp needs CUDA GPUs .*use hardware.strategy ddp"):
        train.main(["--config", str(config)])


def test_a_checkpoint_carries_its_tokenizer_and_recognises_it_by_content(tmp_path):
    """Trained with a train_tokenizer.py folder: the checkpoint works after the folder is gone; a tokenizer
    retrained into the same folder is a different tokenizer (resume and --tokenizer refuse it)."""
    import train_tokenizer

    corpus = ROOT / "data" / "tiny_corpus.txt"
    tok_dir = tmp_path / "tok"
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "300", "--out", str(tok_dir)]) == 0
    config = write_config(tmp_path, {"training": {"max_steps": 2}, "data": {"tokenizer_name": str(tok_dir)}})
    assert train.main(["--config", str(config)]) == 0
    ckpt = tmp_path / "checkpoints" / "final.ckpt"

    # The same words in a differently ordered corpus give other merges: same name, same size, other ids.
    lines = corpus.read_text().splitlines()
    (tmp_path / "shuffled.txt").write_text("\n".join(reversed(lines)))
    assert train_tokenizer.main(["--input", str(tmp_path / "shuffled.txt"), "--vocab-size", "300", "--out",
                                 str(tok_dir), "--overwrite"]) == 0
    assert load_tokenizer(str(tok_dir)).sha256 != read_meta(str(ckpt))["tokenizer_sha256"]
    with pytest.raises(UsageError, match="trained with another tokenizer .* even if the name is the same"):
        train.main(["--config", str(config), "--set", "training.max_steps=4"])
    refused = run_script("infer.py", "--ckpt", ckpt, "--tokenizer", tok_dir, "--prompt", "The", check=False)
    assert refused.returncode == 2 and "is not the one this checkpoint was trained with" in refused.stderr

    shutil.rmtree(tok_dir)  # the folder is gone: the checkpoint still has everything it needs
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    sample = run_script("infer.py", "--ckpt", moved, "--prompt", "The", "--max-new-tokens", "5", "--seed", "0")
    assert sample.stdout.startswith("The")
    evaluated = run_script("eval_val.py", "--ckpt", moved, "--json")
    assert json.loads(evaluated.stdout)["tokenizer"] == str(tok_dir.resolve())


# ---------------------------------------------------------------------------------------------
# Checkpoints from before the model padded its own vocabulary
# ---------------------------------------------------------------------------------------------


def todays_format(model_config, tokenizer, rows: int, seed: int = 0) -> dict:
    """A checkpoint as training.save wrote it before this change: meta's model_config.vocab_size = `rows`,
    the embedding's row count (train.py padded the tokenizer's size to a multiple of 64), tokenizer inside."""
    from model import ModelConfig, Transformer

    old = ModelConfig(**{**vars(model_config), "vocab_size": rows})
    torch.manual_seed(seed)
    model = Transformer(old)  # with vocab_size = rows a multiple of 64, exactly the old network: `rows` logits
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert model.embed.weight.shape[0] == rows
    meta = {"kind": "pretrain", "step": 2, "epoch": 0.1, "tokens_seen": 256, "supervised_seen": 0, "train_loss": 9.0,
            "val_loss": 9.5, "n_params": model.num_parameters(), "model_config": vars(old).copy(), "config": {},
            "tokenizer": tokenizer.spec, "tokenizer_sha256": tokenizer.sha256}
    return {"state_dict": model.state_dict(), "tokenizer": tokenizer.to_dict(), "meta": meta}, model


@pytest.mark.parametrize("rows", [50304, 50368], ids=["padded-by-train.py", "model.vocab_size-set-larger"])
def test_a_checkpoint_of_todays_format_loads_with_the_same_logits_over_the_real_vocabulary(tmp_path, rows):
    import infer
    from checkpoint import check_weights, model_config_of, save_checkpoint
    from model import ModelConfig

    tokenizer = load_tokenizer("gpt2")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32,
                         max_seq_len=16)
    ckpt, old_model = todays_format(config, tokenizer, rows)
    path = tmp_path / "old.ckpt"
    save_checkpoint(ckpt, str(path))
    idx = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        before = old_model.eval()(idx)[..., :tokenizer.vocab_size]  # what every consumer cropped to

    migrated = load_checkpoint(str(path))
    assert migrated["meta"]["model_config"]["vocab_size"] == tokenizer.vocab_size == 50257
    assert model_config_of(migrated["meta"], str(path)) == config
    assert migrated["state_dict"]["embed.weight"].shape[0] == 50304  # config.padded_vocab_size
    check_weights(migrated["state_dict"], config, str(path))
    model, _ = infer.load_model(str(path))
    with torch.no_grad():
        after = model(idx)
    assert after.shape == before.shape == (2, 12, 50257)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # The sidecar still says what the file says; readers of metas alone migrate with the run's tokenizer.
    assert read_meta(str(path))["model_config"]["vocab_size"] == rows
    assert model_config_of(read_meta(str(path)), str(path), tokenizer.vocab_size) == config


def test_an_imported_checkpoint_with_one_row_per_token_gets_zero_padding_rows(tmp_path):
    """A from-hf file of before (HF keeps one row per token: 50257) is padded to 50304 zero rows on load."""
    import infer
    from checkpoint import save_checkpoint
    from model import ModelConfig

    tokenizer = load_tokenizer("gpt2")
    config = ModelConfig(vocab_size=50257, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16,
                         tie_embeddings=False)
    ckpt, _ = todays_format(config, tokenizer, 50304)
    for name in ("embed.weight", "lm_head.weight"):
        ckpt["state_dict"][name] = ckpt["state_dict"][name][:50257].clone()
    ckpt["meta"]["model_config"]["vocab_size"] = 50257
    save_checkpoint(ckpt, str(tmp_path / "imported.ckpt"))
    model, loaded = infer.load_model(str(tmp_path / "imported.ckpt"))
    assert model.embed.weight.shape == model.lm_head.weight.shape == (50304, 16)
    assert not model.lm_head.weight[50257:].any()
    assert torch.equal(model.lm_head.weight[:50257], ckpt["state_dict"]["lm_head.weight"])


def test_a_training_run_of_todays_format_resumes(tiny_run, tmp_path):
    """The folder of a run written before this change (meta: vocab_size 50304, the padded rows) resumes."""
    from checkpoint import save_checkpoint

    folder = tmp_path / "old_run" / "checkpoints"
    shutil.copytree(tiny_run, folder)
    for path in folder.glob("*.ckpt"):  # rewrite every checkpoint as the old code wrote it
        if path.name == "last.ckpt":
            continue
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["state_dict"]["embed.weight"].shape[0] == 50304
        ckpt["meta"]["model_config"]["vocab_size"] = 50304
        save_checkpoint(ckpt, str(path))
    (folder / "last.ckpt").unlink()
    (folder / "last.ckpt.json").unlink()
    config = write_config(folder.parent, {"training": {"max_steps": 8}})
    assert train.main(["--config", str(config)]) == 0
    meta = read_meta(str(folder / "final.ckpt"))
    assert meta["step"] == 8 and meta["model_config"]["vocab_size"] == 50257
