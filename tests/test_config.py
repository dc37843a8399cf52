"""config.py: every mistake in a config file is caught before training starts, with one line naming the key."""

import dataclasses
import importlib.util
import typing

import pytest
import yaml

import schema
from cli import UsageError
from config import Data, Hardware, Training, load_config, model_config
from conftest import run_script, write_config


def config_error(tmp_path, overrides=None, text=None) -> str:
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    else:
        path = write_config(tmp_path, overrides, name="bad.yaml")
    with pytest.raises(UsageError) as info:
        load_config(str(path))
    return str(info.value)


def test_valid_config_and_overrides(tiny_config):
    cfg = load_config(str(tiny_config), ["training.lr=0.01", "model.n_layers=3", "data.offline=true"])
    assert cfg.training.lr == 0.01 and cfg.model["n_layers"] == 3 and cfg.data.offline is True
    assert model_config(cfg, vocab_size=100).vocab_size == 100  # from the tokenizer unless set
    assert load_config(str(tiny_config), ["training.precision=32"]).training.precision == "32"  # YAML reads a number


def test_unknown_key_suggests_the_right_one(tmp_path):
    assert "did you mean 'max_steps'" in config_error(tmp_path, {"training": {"max_step": 5}})
    assert "did you mean 'training'" in config_error(tmp_path, text="trainng:\n  lr: 1.0\n")


@pytest.mark.parametrize("section,key,value,message", [
    ("training", "max_steps", "ten", "training.max_steps must be an integer >= 1 or null, got 'ten'"),
    ("training", "lr", -1.0, "training.lr must be a number > 0, got -1.0"),
    ("training", "lr_schedule", "linear", "warmup_cosine, wsd or plateau"),
    ("model", "d_model", 30, "divisible by model.n_heads"),
    ("model", "n_kv_heads", 3, "divisible by model.n_kv_heads"),
    ("model", "n_layers", 0, "model.n_layers must be an integer >= 1, got 0"),
    ("training", "seq_len", 64, "exceeds model.max_seq_len"),
    ("hardware", "accelerator", "tpu", "hardware.accelerator"),
    ("data", "streaming", "yes", "data.streaming must be bool"),
    ("training", "lr", float("nan"), "training.lr must be a finite number, got nan"),
    ("training", "max_time", "inf", "training.max_time must be a finite number"),
    ("model", "dropout", float("inf"), "model.dropout must be a finite number"),
    ("hardware", "devices", 0, "hardware.devices must be an integer >= 1 or auto, got 0"),
    ("hardware", "devices", "all", "hardware.devices must be an integer >= 1 or auto, got 'all'"),
    ("hardware", "num_workers", -1, "hardware.num_workers must be an integer >= 0, got -1"),
    ("hardware", "strategy", "horovod", "hardware.strategy must be auto, ddp, fsdp or deepspeed"),
    ("training", "loggers", "csv", "training.loggers must be a list, each csv, tensorboard, wandb or mlflow, got 'csv'"),
    ("training", "loggers", ["csv", "neptune"], "training.loggers[1] must be csv, tensorboard, wandb or mlflow"),
    ("training", "betas", [0.9, 1.0], "training.betas[1] must be a number in [0, 1), got 1.0"),
    ("training", "betas", [0.9], "training.betas must be two numbers in [0, 1), got [0.9]"),
    ("training", "max_steps", None, "training.max_steps is null (no step limit) but training.max_time is not set"),
    ("training", "val_every", 0, "training.val_every must be an integer >= 1 or null, got 0"),
    ("model", "mlp", "gelu", "model.mlp must be swiglu or relu2, got 'gelu'"),
])
def test_impossible_values_name_the_key(tmp_path, section, key, value, message):
    assert message in config_error(tmp_path, {section: {key: value}})


def test_yaml_syntax_error_names_the_line(tmp_path):
    assert "at line 2" in config_error(tmp_path, text="training:\n  lr: 1e-3: 2\n")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    bad = write_config(tmp_path, {"training": {"max_step": 5}}, name="bad.yaml")
    result = run_script("train.py", "--config", bad, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "unknown config key 'training.max_step'" in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing was started


def test_shipped_configs_are_valid():
    for name in ("config.yaml", "config_smoke.yaml"):
        cfg = load_config(name)
        assert yaml.safe_load(open(name))  # and they are plain YAML
        assert cfg.training.seq_len <= model_config(cfg, 50304).max_seq_len


def declared_keys():
    """(key, type hint with its declaration) for every key of every section, model's from model.ModelConfig."""
    from model import ModelConfig

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, hints[f.name]

    for section, cls in {"model": ModelConfig, "training": Training, "hardware": Hardware, "data": Data}.items():
        yield from walk(cls, f"{section}.")


def set_key(key: str, value) -> dict:
    """{'training': {'early_stopping': {'patience': 3}}} for ('training.early_stopping.patience', 3)."""
    *sections, name = key.split(".")
    raw = {name: value}
    for section in reversed(sections):
        raw = {section: raw}
    return raw


CHOICES = [(key, hint) for key, hint in declared_keys() if typing.get_origin(hint) is typing.Literal]
RANGES = [(key, hint) for key, hint in declared_keys() if typing.get_origin(hint) is typing.Annotated]


def test_the_constrained_keys_are_declared():
    """Every key that has choices or bounds declares them on its type (the lists below would shrink otherwise)."""
    assert {k for k, _ in CHOICES} == {"model.mlp", "training.optimizer", "training.lr_schedule", "training.precision",
                                       "hardware.accelerator", "hardware.strategy", "data.txt_documents"}
    assert {"training.seq_len", "training.lr", "training.warmup_ratio", "training.seed", "training.keep_last",
            "model.dropout", "model.n_layers", "data.val_docs"} <= {k for k, _ in RANGES}


@pytest.mark.parametrize("key, hint", CHOICES)
def test_every_declared_choice_is_accepted_and_the_message_lists_exactly_them(tmp_path, key, hint):
    """The check, the message and the values come from one Literal[...]: bf16-true, once missing from the
    message of training.precision, cannot be missing again."""
    for value in typing.get_args(hint):
        if value == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            assert "needs the deepspeed package" in config_error(tmp_path, set_key(key, value))
            continue
        cfg = load_config(str(write_config(tmp_path, set_key(key, value))))
        section, name = key.split(".")
        assert (cfg.model[name] if section == "model" else getattr(getattr(cfg, section), name)) == value
    message = config_error(tmp_path, set_key(key, "no-such-value"))
    assert message == f"{key} must be {schema.allowed(hint)}, got 'no-such-value'"
    assert all(str(v) in message for v in typing.get_args(hint))


@pytest.mark.parametrize("key, hint", RANGES)
def test_every_declared_range_refuses_the_numbers_beyond_it_in_one_line(tmp_path, key, hint):
    kind, bounds = typing.get_args(hint)
    step = 1 if kind is int else 1e-9
    inside = [b for b in (bounds.ge, bounds.le) if b is not None]
    outside = [b for b in (bounds.gt, bounds.lt) if b is not None]
    outside += [bounds.ge - step] if bounds.ge is not None else []
    outside += [bounds.le + step] if bounds.le is not None else []
    for value in inside:  # allowed by the declaration (another rule, e.g. d_model % n_heads, may still refuse it)
        try:
            load_config(str(write_config(tmp_path, set_key(key, kind(value)))))
        except UsageError as e:
            assert not str(e).startswith(f"{key} must be"), e
    for value in outside:
        assert config_error(tmp_path, set_key(key, kind(value))) == f"{key} must be {schema.allowed(hint)}, got {kind(value)!r}"


def test_off_means_null_for_max_steps_val_every_and_save_every(tmp_path):
    """null, not a huge number: no validation or periodic checkpoint until the end, no step limit with max_time."""
    off = {"training": {"max_steps": None, "max_time": 60, "val_every": None, "save_every": None}}
    t = load_config(str(write_config(tmp_path, off))).training
    assert (t.max_steps, t.val_every, t.save_every, t.max_time) == (None, None, None, 60.0)
    assert "training.save_every must be an integer >= 1 or null, got 0" in config_error(
        tmp_path, {"training": {"save_every": 0}})


@pytest.mark.parametrize("text, message", [
    ("training:\n  lr: 0.001\n  lr: 0.01\n", "duplicate key 'training.lr' in {path} at line 3 (first at line 2)"),
    ("training:\n  seed: 1\ndata:\n  val_docs: 2\ntraining:\n  lr: 0.1\n", "duplicate key 'training' in {path} at line 5"),
    ("training:\n  early_stopping:\n    patience: 2\n    patience: 3\n", "duplicate key 'training.early_stopping.patience'"),
    ("", "{path} is empty: a config needs at least one section"),
    ("# only a comment\n", "{path} is empty"),
    ("- training\n", "{path} must contain a mapping of sections"),
    ("training:\n  lr: \x01\n", "YAML syntax error in {path}: unacceptable character #x0001"),  # one line, not PyYAML's 3
])
def test_yaml_that_would_load_wrongly_is_refused(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys without a word; an empty file would mean "all defaults"."""
    error = config_error(tmp_path, text=text)
    assert message.format(path=tmp_path / "bad.yaml") in error and "\n" not in error


def test_yaml_that_is_not_utf8_text_is_refused_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_bytes(b"training:\n  lr: 0.001\n# r\xe9glage fin\n")
    with pytest.raises(UsageError, match=r"bad\.yaml:3: not UTF-8 text \(byte 0xe9\)"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad.yaml").write_bytes(b"\x80\x04\x95PK\x03\x04\x00\x00")  # a pickle or zip under a .yaml name
    with pytest.raises(UsageError, match="not UTF-8 text|binary data"):
        load_config(str(tmp_path / "bad.yaml"))


def test_anchors_merge_keys_and_a_byte_order_mark_are_fine(tmp_path):
    """Repeated values through YAML's own means are not duplicates; a UTF-8 BOM (Windows editors) is not text."""
    path = tmp_path / "ok.yaml"
    path.write_bytes("\ufefftraining: &t\n  lr: 0.01\n  seed: 3\nhardware:\n  num_workers: 0\n".encode())
    assert load_config(str(path)).training.lr == 0.01
    from config import read_yaml

    path.write_text("base: &b {lr: 0.01}\nother:\n  <<: *b\n  lr: 0.02\n  again: *b\n")
    assert read_yaml(str(path))["other"] == {"lr": 0.02, "again": {"lr": 0.01}}


@pytest.mark.parametrize("key, value", [("dropout", 0.25), ("gradient_checkpointing", True), ("qk_norm", True)])
def test_the_keys_that_may_change_between_runs_are_one_list(tmp_path, tiny_run, key, value):
    """Resuming (training.py) and fine-tuning (finetune.py) both read ModelConfig.ADJUSTABLE: a change of one of
    those keys is taken by both, a change of any other key refused by both."""
    import shutil

    import finetune
    import training
    from checkpoint import read_meta
    from tokenizer import load_tokenizer
    from model import ModelConfig

    meta = read_meta(str(tiny_run / "final.ckpt"))
    folder = tmp_path / "run"
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    changed = ModelConfig(**{**meta["model_config"], key: value})
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({"finetune": {"base_checkpoint": str(tiny_run / "final.ckpt")}, "model": {key: value},
                                   "training": {"checkpoint_dir": str(tmp_path / "sft"), "seq_len": 32}}))
    if key in ModelConfig.ADJUSTABLE:
        assert training.find_resume_checkpoint(str(folder), changed, load_tokenizer(meta["tokenizer"]), "pretrain")
        assert getattr(finetune.read_base(finetune.load_finetune_config(str(sft)))[1], key) == value
    else:
        with pytest.raises(UsageError, match=f"its model.{key} is"):
            training.find_resume_checkpoint(str(folder), changed, load_tokenizer(meta["tokenizer"]), "pretrain")
        with pytest.raises(UsageError, match=f"model.{key} is {value} in the config but"):
            finetune.read_base(finetune.load_finetune_config(str(sft)))
