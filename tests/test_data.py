"""data.py: packing, data order and sharding, the token cache.

    python -m pytest -q tests/test_data.py
"""

import json
import os

import pytest
import torch

import data as data_module
import sources
from config import Data
from conftest import ROOT
from data import PackedWindows, ShuffledPasses, StridedSampler, cache_key, load_tokens, tokenize_documents
from sources import split_documents
from tokenizer import load_tokenizer

# --- packing -----------------------------------------------------------------------------------


def test_documents_are_joined_with_eos():
    tok = load_tokenizer("gpt2")
    flat = tokenize_documents(["Hello world", "Hello"], tok)
    assert flat.tolist() == [15496, 995, tok.eos_id, 15496, tok.eos_id]
    assert flat.dtype == torch.int32  # one flat tensor, not a list of tensors


def test_windows_shift_by_one_and_predict_every_token_once():
    tokens = torch.arange(23, dtype=torch.int32)
    windows = PackedWindows(tokens, seq_len=5)
    assert len(windows) == 4  # (23 - 1) // 5
    x, y = windows[1]
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    assert targets.tolist() == list(range(1, 21))  # each token is a target exactly once


# --- order and sharding ------------------------------------------------------------------------


def test_ranks_get_disjoint_shares_that_cover_everything():
    shares = [list(StridedSampler(0, 20, rank, 3)) for rank in range(3)]
    assert sorted(sum(shares, [])) == list(range(20))
    assert all(not set(a) & set(b) for a in shares for b in shares if a is not b)


def test_data_order_is_reproducible_and_resumable():
    windows = PackedWindows(torch.arange(101, dtype=torch.int32), seq_len=10)  # 10 windows
    run = ShuffledPasses(windows, seed=7)
    again = ShuffledPasses(windows, seed=7)
    first = [run[k][0][0].item() for k in range(25)]  # 2.5 passes
    assert first == [again[k][0][0].item() for k in range(25)]
    assert sorted(first[:10]) == list(range(0, 100, 10))  # each pass visits every window once
    assert first[:10] != first[10:20]  # and each pass has its own order
    resumed = [again[k][0][0].item() for k in StridedSampler(12, 25)]
    assert resumed == first[12:]
    assert [ShuffledPasses(windows, seed=8)[k][0][0].item() for k in range(10)] != first[:10]


# --- the token cache ---------------------------------------------------------------------------


def corrupt(path, how):
    """Damage one cache entry (path without suffix) the way a crash, a full disk or a stray write would."""
    bin_, about = path.with_suffix(".bin"), path.with_suffix(".json")
    if how == "truncated":
        bin_.write_bytes(bin_.read_bytes()[:-40])
    elif how == "garbage":
        bin_.write_bytes(os.urandom(bin_.stat().st_size))
    elif how == "garbage with a matching json":  # the right size and checksum, but ids no tokenizer has
        content = (torch.arange(bin_.stat().st_size // 4, dtype=torch.int32) + 10**6).numpy().tobytes()
        bin_.write_bytes(content)
        meta = json.loads(about.read_text())
        meta["sha256"] = __import__("hashlib").sha256(content).hexdigest()
        about.write_text(json.dumps(meta))
    elif how == "no json":
        about.unlink()
    elif how == "no bin":
        bin_.unlink()
    elif how == "json disagrees":
        meta = json.loads(about.read_text())
        meta["tokens"] -= 10
        about.write_text(json.dumps(meta))
    elif how == "json damaged":
        about.write_text('{"tokens": ')
    elif how == "same length, other tokens":
        tokens = torch.from_file(str(bin_), size=bin_.stat().st_size // 4, dtype=torch.int32).clone()
        bin_.write_bytes(tokens.flip(0).numpy().tobytes())


@pytest.mark.parametrize("how", ["truncated", "garbage", "garbage with a matching json", "no json", "no bin",
                                 "json disagrees", "json damaged", "same length, other tokens"])
def test_a_damaged_token_cache_is_rebuilt(tmp_path, capsys, monkeypatch, how):
    cfg = Data(dataset=str(ROOT / "data" / "tiny_corpus.txt"), val_docs=4, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer("gpt2")
    right = tokenize_documents(split_documents(cfg)[0], tok)
    load_tokens(split_documents(cfg)[0], tok, cfg, "train")
    entry = tmp_path / "cache" / cache_key(cfg, "train", tok)
    corrupt(entry, how)
    capsys.readouterr()
    again = load_tokens(split_documents(cfg)[0], tok, cfg, "train")
    assert torch.equal(again, right)
    err = capsys.readouterr().err
    assert f"train token cache {entry}.bin is unusable (" in err and "): rebuilding it" in err
    monkeypatch.setattr(data_module, "tokenize_documents", lambda *a, **k: pytest.fail("the rebuilt cache missed"))
    assert torch.equal(load_tokens(split_documents(cfg)[0], tok, cfg, "train"), right)


def test_a_cache_hit_reads_no_text(tmp_path, monkeypatch):
    cfg = Data(dataset=str(ROOT / "data" / "tiny_corpus.txt"), val_docs=4, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer("gpt2")
    train, val, _ = split_documents(cfg)
    built = load_tokens(train, tok, cfg, "train"), load_tokens(val, tok, cfg, "val")
    monkeypatch.setattr(sources, "read_text", lambda path: pytest.fail(f"read {path} despite the cache"))
    train, val, _ = split_documents(cfg)
    assert torch.equal(load_tokens(train, tok, cfg, "train"), built[0])
    assert torch.equal(load_tokens(val, tok, cfg, "val"), built[1])


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path, capsys):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    cfg = Data(dataset=str(ROOT / "data" / "tiny_corpus.txt"), val_docs=4, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer("gpt2")
    tokens = load_tokens(split_documents(cfg)[1], tok, cfg, "val")
    assert torch.equal(tokens, tokenize_documents(split_documents(cfg)[1], tok))
    assert f"val tokens: {len(tokens):,} tokenized, not cached: cannot write" in capsys.readouterr().err
