"""The pieces of the tiny-Shakespeare benchmark: own tokenizer, token cache, time budget, honest split.

    python -m pytest tests/test_shakespeare_pieces.py -x -q
"""

import json
import math
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, run_script, write_config

sys.path.insert(0, str(ROOT / "benchmarks"))

import data as data_module  # noqa: E402
import shakespeare  # noqa: E402  (benchmarks/shakespeare.py)
from checkpoint import read_meta  # noqa: E402
import train_tokenizer  # noqa: E402
from config import Data, Training  # noqa: E402
from data import cache_key, load_tokens  # noqa: E402
from sources import split_documents  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CORPUS = ROOT / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def own_tokenizer(tmp_path_factory):
    """A 300-token BPE learned from the tiny corpus by train_tokenizer.py, as a user would."""
    folder = tmp_path_factory.mktemp("tok") / "bpe300"
    assert train_tokenizer.main(["--input", str(CORPUS), "--vocab-size", "300", "--out", str(folder)]) == 0
    return folder


# --- train_tokenizer.py ------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_and_has_eos(own_tokenizer):
    tok = load_tokenizer(str(own_tokenizer))
    assert tok.vocab_size == 300
    assert tok.decode([tok.eos_id]) == train_tokenizer.EOS
    assert tok.spec == str(own_tokenizer.resolve())  # what a checkpoint records for --tokenizer auto
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  Zoë's café — 42!\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: every byte survives, newlines and non-ASCII included
    assert tok.eos_id not in ids  # the EOS string never appears by accident in plain text
    with open(own_tokenizer / "tokenizer_config.json") as f:
        assert json.load(f)["eos_token"] == "<|endoftext|>"


def test_compression_is_reported_on_held_out_text(tmp_path, capsys):
    train_txt, val_txt = tmp_path / "a.txt", tmp_path / "b.txt"
    train_txt.write_text(CORPUS.read_text()[:20000])
    val_txt.write_text(CORPUS.read_text()[20000:])
    train_tokenizer.main(["--input", str(train_txt), "--heldout", str(val_txt), "--vocab-size", "400",
                          "--out", str(tmp_path / "tok")])
    line = capsys.readouterr().out.splitlines()[0]
    assert f"bytes/token on {val_txt}" in line
    bpt = float(line.split(" bytes/token")[0].rsplit(" ", 1)[1])
    tok = load_tokenizer(str(tmp_path / "tok"))
    held_out = val_txt.read_text()
    assert bpt == pytest.approx(len(held_out.encode()) / len(tok.encode(held_out)), abs=1e-3)
    assert bpt > 1.5  # merges learned on one part of the corpus compress the rest


def test_train_tokenizer_bad_input_is_one_line(tmp_path):
    result = run_script("train_tokenizer.py", "--input", tmp_path / "missing.txt", "--out", tmp_path / "t",
                        check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: input file not found") and result.stderr.count("\n") == 1
    assert not (tmp_path / "t").exists()


# --- the token cache (data.load_tokens) --------------------------------------------------------


def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized although the cache should have answered")


def test_cache_hit_memory_maps_the_same_tokens(tmp_path, monkeypatch):
    cfg = Data(dataset=str(CORPUS), val_docs=4, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer("gpt2")
    train_docs, _, _ = split_documents(cfg)
    built = load_tokens(train_docs, tok, cfg, "train")
    assert len(os.listdir(tmp_path / "cache")) == 2  # KEY.bin and KEY.json
    monkeypatch.setattr(data_module, "tokenize_documents", no_tokenizing)
    cached = load_tokens(split_documents(cfg)[0], tok, cfg, "train")
    assert torch.equal(cached, built) and cached.dtype == torch.int32


def test_cache_key_follows_content_tokenizer_and_settings(tmp_path, own_tokenizer):
    text = CORPUS.read_text()
    (tmp_path / "a.txt").write_text(text)
    gpt2 = load_tokenizer("gpt2")
    base = Data(dataset=str(tmp_path / "a.txt"), val_docs=4)
    key = cache_key(base, "train", gpt2)

    (tmp_path / "moved.txt").write_text(text)  # same bytes elsewhere: the same tokens, the same key
    assert cache_key(Data(dataset=str(tmp_path / "moved.txt"), val_docs=4), "train", gpt2) == key
    assert cache_key(Data(dataset=str(tmp_path / "a.txt"), val_docs=4, cache_dir="elsewhere"), "train", gpt2) == key

    assert cache_key(base, "val", gpt2) != key  # the other part
    assert cache_key(base, "train", load_tokenizer(str(own_tokenizer))) != key  # another tokenizer
    for setting in ({"val_docs": 5}, {"txt_documents": "file"}, {"max_doc_len": 16}, {"train_docs": 10}):
        assert cache_key(Data(dataset=str(tmp_path / "a.txt"), **{"val_docs": 4, **setting}), "train", gpt2) != key
    (tmp_path / "a.txt").write_text(text.replace("the", "thy", 1))  # one changed byte
    assert cache_key(base, "train", gpt2) != key


def test_cache_off_tokenizes_every_time(monkeypatch):
    cfg = Data(dataset=str(CORPUS), val_docs=4, cache_dir=None)
    calls, original = [], data_module.tokenize_documents

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(data_module, "tokenize_documents", counting)
    first = load_tokens(split_documents(cfg)[1], load_tokenizer("gpt2"), cfg, "val")
    second = load_tokens(split_documents(cfg)[1], load_tokenizer("gpt2"), cfg, "val")
    assert len(calls) == 2 and torch.equal(first, second) and len(first) > 0


# --- training.max_time: the LR schedule runs on the clock --------------------------------------


def test_time_budget_schedule_follows_the_clock():
    from training import lr_multiplier

    t = Training(max_steps=None, max_time=100.0, warmup_ratio=0.1, min_lr_ratio=0.1)  # time-boxed: the clock alone
    assert lr_multiplier(0, t, elapsed=5.0) == pytest.approx(0.5)  # half-way through the warm-up
    assert lr_multiplier(0, t, elapsed=10.0) == pytest.approx(1.0)  # peak when warm-up time is over
    assert lr_multiplier(0, t, elapsed=55.0) == pytest.approx(0.55)  # cosine mid-point: (1 + 0.1) / 2
    assert lr_multiplier(0, t, elapsed=100.0) == pytest.approx(0.1)  # the floor when time runs out
    assert lr_multiplier(0, t, elapsed=500.0) == pytest.approx(0.1)
    # Whichever budget is nearer its end leads: 50 of 100 steps done in 1 s is half-way, like 50 s of 100.
    t_steps = Training(max_steps=100, max_time=100.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lr_multiplier(49, t_steps, elapsed=1.0) == pytest.approx(lr_multiplier(0, t_steps, elapsed=50.0))
    assert lr_multiplier(99, t_steps, elapsed=1.0) == pytest.approx(0.1)  # the last step gets the floor
    # Without max_time the step schedule is unchanged, whatever the clock says.
    plain = Training(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lr_multiplier(50, plain, elapsed=1e9) == lr_multiplier(50, plain)


def test_resume_continues_the_clock(tiny_run, tmp_path):
    """The time budget goes on from where it stood; reset_lr_on_resume restarts it with the schedule."""
    from lightning_fabric import Fabric

    import training
    from config import load_config, model_config
    from model import Transformer

    resumable = tiny_run / "epoch=0-step=6.ckpt"  # final.ckpt holds the weights only: runs resume from this one
    meta = read_meta(str(resumable))
    trained = meta["train_state"]["train_time"]
    assert trained > 0
    for reset in (False, True):
        cfg = load_config(str(write_config(tmp_path, {"training": {"reset_lr_on_resume": reset}})))
        fabric = Fabric(accelerator="cpu", devices=1)
        model = Transformer(model_config(cfg, meta["model_config"]["vocab_size"]))
        optimizers, _ = training.make_optimizers(model, cfg.training)
        model, optimizers = training.setup(fabric, model, optimizers)
        state = training.restore(fabric, str(resumable), model, optimizers, cfg.training)
        assert state.step == 6
        assert (state.train_time, state.schedule_offset) == ((0.0, 6) if reset else (trained, 0))

    cfg = load_config(str(write_config(tmp_path, {"training": {"max_time": 100.0, "max_steps": None}})))
    assert training.already_done(training.ResumePoint("x.ckpt", {"step": 40, "train_state": {"train_time": 100.5}}), cfg.training)
    assert not training.already_done(training.ResumePoint("x.ckpt", {"step": 40, "train_state": {"train_time": 60.0}}), cfg.training)


def test_training_stops_when_time_is_up(tmp_path, capsys):
    """A time-boxed run (max_steps null) with validation and checkpoints off until the end (null)."""
    import train

    config = write_config(tmp_path, {"training": {"max_steps": None, "max_time": 2.0, "val_every": None,
                                                  "save_every": None, "log_every": 10**6}})
    assert train.main(["--config", str(config), "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    meta = read_meta(str(tmp_path / "checkpoints" / "final.ckpt"))
    assert 2.0 <= meta["train_time"] < 60 and meta["step"] > 0
    out = capsys.readouterr().out
    assert "time-boxed: 2 s, no step limit" in out  # the plan
    assert re.findall(r"^step (\d+) \(time-boxed: 2 s\) \| val_loss", out, re.M) == [str(meta["step"])]  # once, at the end
    # no periodic checkpoint: only the one the end of every run writes, to resume from (final.ckpt is weights only)
    periodic = [p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt")]
    assert len(periodic) == 1 and periodic[0].endswith(f"-step={meta['step']}.ckpt"), periodic
    assert meta["matmul_peak_flops"] > 0
    assert meta["val_loss"] is not None  # the final weights were validated once


# --- benchmarks/shakespeare.py: the validation bytes stay out of training ----------------------


def test_split_is_first_90_percent_and_moves_off_a_character_middle(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a" * 89 + "é".encode() + b"b" * 9)  # 100 bytes; byte 90 is inside the é
    train_txt, val_txt = shakespeare.split_corpus(str(corpus), str(tmp_path))
    train_bytes, val_bytes = open(train_txt, "rb").read(), open(val_txt, "rb").read()
    assert train_bytes + val_bytes == corpus.read_bytes()
    assert len(train_bytes) == 89 and val_bytes.decode().startswith("é")

    corpus.write_bytes(bytes(range(32, 127)) * 3)  # 285 ASCII bytes: cut exactly at int(0.9 * n)
    train_txt, val_txt = shakespeare.split_corpus(str(corpus), str(tmp_path))
    assert os.path.getsize(train_txt) == int(0.9 * 285) and os.path.getsize(val_txt) == 285 - int(0.9 * 285)


def test_only_evaluation_reads_the_validation_file(tmp_path):
    tokenizer_cmd, train_cmd = shakespeare.commands("/w/train.txt", "/w/val.txt", "/w", 1024, 150.0, [])
    assert "/w/val.txt" not in " ".join(tokenizer_cmd)  # the tokenizer learns from the training text only
    mentions = [arg for arg in train_cmd if "/w/val.txt" in arg]
    assert mentions == ["data.val_dataset=/w/val.txt"]  # train.py: its validation, never training data
    assert "data.dataset=/w/train.txt" in train_cmd and "training.max_time=150.0" in train_cmd


def test_scoring_counts_every_validation_byte_once():
    from model import ModelConfig, Transformer

    tok = load_tokenizer("gpt2")
    model = Transformer(ModelConfig(vocab_size=50304, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                                    max_seq_len=16))
    text = CORPUS.read_text()[:3000] + "\nZoë\n"
    result = shakespeare.score_text(model, tok, text, seq_len=16, batch_size=8)  # raises if a byte is missed
    assert result["bytes"] == len(text.encode())
    assert result["tokens"] == len(tok.encode(text))  # every token predicted once; EOS only as context
    # An untrained model is close to uniform over its vocabulary: bpb near log2(vocab) * tokens / bytes.
    uniform = math.log2(50304) * result["tokens"] / result["bytes"]
    assert 0.8 * uniform < result["val_bpb"] < 1.2 * uniform
