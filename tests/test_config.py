"""config.py: every mistake in a config file is caught before training starts, with one line naming the key."""

import pytest
import yaml

from cli import UsageError
from config import load_config, model_config
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
    assert cfg.training.lr == 0.01 and cfg.model.n_layers == 3 and cfg.data.offline is True
    assert model_config(cfg, vocab_size=100).vocab_size == 100  # from the tokenizer unless set
    assert load_config(str(tiny_config), ["training.precision=32"]).training.precision == "32"  # YAML reads a number


def test_unknown_key_suggests_the_right_one(tmp_path):
    assert "did you mean 'max_steps'" in config_error(tmp_path, {"training": {"max_step": 5}})
    assert "did you mean 'training'" in config_error(tmp_path, text="trainng:\n  lr: 1.0\n")


@pytest.mark.parametrize("section,key,value,message", [
    ("training", "max_steps", "ten", "training.max_steps must be int"),
    ("training", "lr", -1.0, "training.lr must be positive"),
    ("training", "lr_schedule", "linear", "warmup_cosine, wsd or plateau"),
    ("model", "d_model", 30, "divisible by model.n_heads"),
    ("model", "n_kv_heads", 3, "divisible by model.n_kv_heads"),
    ("model", "n_layers", 0, "model.n_layers must be a positive"),
    ("training", "seq_len", 64, "exceeds model.max_seq_len"),
    ("hardware", "accelerator", "tpu", "hardware.accelerator"),
    ("data", "streaming", "yes", "data.streaming must be bool"),
    ("training", "lr", float("nan"), "training.lr must be a finite number, got nan"),
    ("training", "max_time", "inf", "training.max_time must be a finite number"),
    ("model", "dropout", float("inf"), "model.dropout must be a finite number"),
    ("hardware", "devices", 0, "hardware.devices must be a positive integer or auto"),
    ("hardware", "devices", "all", "hardware.devices must be a positive integer or auto, got 'all'"),
    ("hardware", "num_workers", -1, "hardware.num_workers >= 0"),
    ("hardware", "strategy", "horovod", "hardware.strategy must be auto, ddp, fsdp or deepspeed"),
    ("training", "loggers", "csv", "training.loggers must be list"),
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


def test_model_section_has_exactly_model_config_s_keys():
    """config.Model repeats model.ModelConfig's fields (each optional): the two lists cannot drift apart."""
    import dataclasses
    import typing

    from config import Model
    from model import ModelConfig

    ours = {f.name: typing.get_type_hints(Model)[f.name] for f in dataclasses.fields(Model)}
    theirs = {f.name: typing.Optional[typing.get_type_hints(ModelConfig)[f.name]] for f in dataclasses.fields(ModelConfig)}
    assert ours == theirs
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
