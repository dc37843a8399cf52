"""sources.py: the Hub rule and offline mode, every local format, records, bad input in one line, the held-out split.

    python -m pytest -q tests/test_sources.py
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import sources
from cli import UsageError
from config import Data
from conftest import ROOT
from data import cache_key
from sources import HoldOutLast, is_hub_name, iter_documents, iter_records, split_documents, split_records
from tokenizer import load_tokenizer


# --- the Hub -----------------------------------------------------------------------------------


def test_hub_names_and_local_paths(tmp_path, monkeypatch):
    """The one rule: `name` or `owner/name` with nothing on disk is a Hub name; anything else is local."""
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "wikimedia/wikipedia", "roneneldan/TinyStories", "HuggingFaceFW/fineweb-edu"):
        assert is_hub_name(name), name
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    for name in ("owner/name", "./corpus", "/data/x", "~/x", "a/b/c", "corpus.txt", "owner/data.parquet",
                 "runs/*.jsonl", "exp[1]", "C:\\data"):
        assert not is_hub_name(name), name


def write_hub_cache(cache):
    """A Hugging Face cache (huggingface_hub's layout) holding one dataset and one tokenizer, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, files in {
        "datasets--someone--tiny": {
            "README.md": "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.jsonl\n"
                         "  - split: validation\n    path: val.jsonl\n---\n",
            "train.jsonl": "".join(json.dumps({"text": f"train {i}"}) + "\n" for i in range(8)),
            "val.jsonl": "".join(json.dumps({"text": f"val {i}"}) + "\n" for i in range(3))},
        "models--someone--tok": {
            "tokenizer.json": load_tokenizer("gpt2").backend.to_str(),
            "tokenizer_config.json": json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})},
    }.items():
        (cache / repo / "refs").mkdir(parents=True)
        (cache / repo / "refs" / "main").write_text(commit)
        snapshot = cache / repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, text in files.items():
            (snapshot / name).write_text(text)


OFFLINE_PROBE = textwrap.dedent("""
    import json, os, sys, time
    import train  # imports Lightning, which imports huggingface_hub: HF_HUB_OFFLINE is read there, and was unset
    from cli import UsageError
    from config import Data
    from sources import iter_documents, split_documents
    from tokenizer import load_tokenizer

    def timed(what):
        start = time.perf_counter()
        try:
            result = what()
        except UsageError as e:
            result = f"error: {e}"
        return [result, time.perf_counter() - start]

    out = {
        "tokenizer": timed(lambda: load_tokenizer("nobody/not-cached", offline=True)),
        "dataset": timed(lambda: list(iter_documents(Data(dataset="nobody/not-cached", offline=True)))),
        "cached_tokenizer": timed(lambda: load_tokenizer("someone/tok", offline=True).encode("Hello world")),
        "cached_dataset": timed(lambda: [list(part) for part in split_documents(Data(dataset="someone/tiny",
                                                                                    offline=True, val_docs=2))[:2]]),
        "cached_split": timed(lambda: list(split_documents(Data(dataset="someone/tiny", offline=True,
                                                                val_split="validation", val_docs=0))[1])),
    }
    os.environ["HF_HUB_OFFLINE"] = "1"  # set late, after huggingface_hub read it: still offline
    out["env_late"] = timed(lambda: load_tokenizer("nobody/not-cached"))
    print(json.dumps(out))
""")


def test_offline_is_offline_in_a_fresh_process(tmp_path):
    """data.offline: true never waits for the network, even when huggingface_hub was imported first.

    A fresh process (conftest's HF_HUB_OFFLINE=1 removed) talks to an endpoint that accepts connections
    and never answers: the Hub client's retry loop would take minutes there (35-55 s against the real
    unreachable Hub). Names that are not cached fail within a second, in one line; cached ones load.
    """
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes connections; nothing ever reads or answers them
    write_hub_cache(tmp_path / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{hole.getsockname()[1]}", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), HF_HOME=str(tmp_path / "home"))
    try:
        result = subprocess.run([sys.executable, "-c", OFFLINE_PROBE], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=240)
    finally:
        hole.close()
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    for name in ("tokenizer", "dataset", "env_late"):
        message, seconds = out[name]
        assert seconds < 1.5, (name, seconds)
        assert message.startswith("error: ") and "not found in the local cache (offline mode)" in message, message
        assert "\n" not in message
    assert out["cached_tokenizer"][0] == [15496, 995]
    assert out["cached_dataset"][0] == [[f"train {i}" for i in range(6)], ["train 6", "train 7"]]
    assert out["cached_split"][0] == ["val 0", "val 1", "val 2"]


def test_unreachable_hub_fails_fast(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.time()
    with pytest.raises(UsageError, match="cannot reach the Hugging Face Hub"):
        load_tokenizer("someone/some-tokenizer")
    with pytest.raises(UsageError, match="cannot reach the Hugging Face Hub"):
        split_documents(Data(dataset="someone/some-dataset"))  # checked when split, before anything is read
    assert time.time() - start < 5


# --- document sources --------------------------------------------------------------------------

DOCS = ["first document", "second, with a comma", 'third "quoted"', "fourth: Ünïcödé 🙂", "fifth", "sixth",
        "seventh", "eighth"]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_source(folder, kind, docs=DOCS, name="docs"):
    """The same documents in one of the formats a source may have; returns the path to name in data.dataset."""
    import datasets

    records = [{"text": d, "n": i} for i, d in enumerate(docs)]
    path = folder / f"{name}.{kind}"
    if kind == "txt":
        write_lines(path, docs)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":  # a JSON array, as json.dump writes a list
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif kind == "csv":
        datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    elif kind == "saved":
        path = folder / f"{name}_saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


KINDS = ["txt", "jsonl", "json", "parquet", "csv", "saved"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_local_format_gives_the_same_documents_and_the_same_split(tmp_path, kind):
    source = write_source(tmp_path, kind)
    assert list(iter_documents(Data(dataset=str(source)))) == DOCS
    train, val, how = split_documents(Data(dataset=str(source), val_docs=3))
    assert list(train) == DOCS[:5] and list(val) == DOCS[5:]  # one held-out rule: the LAST val_docs
    assert how == f"validation = the last 3 documents of {source}; training = the documents before them"


def test_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert list(iter_documents(Data(dataset=str(path)))) == ["a", "b"]


def test_txt_modes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo\n\nthree\nfour\n", encoding="utf-8")
    assert list(iter_documents(Data(dataset=str(path)))) == ["one", "two", "three", "four"]
    assert list(iter_documents(Data(dataset=str(path), txt_documents="paragraph"))) == ["one\ntwo", "three\nfour"]
    assert list(iter_documents(Data(dataset=str(path), txt_documents="file"))) == ["one\ntwo\n\nthree\nfour"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffone\ntwo\n".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "one"}\n'.encode())
    assert list(iter_documents(Data(dataset=str(tmp_path / "bom.txt")))) == ["one", "two"]
    assert list(iter_documents(Data(dataset=str(tmp_path / "bom.jsonl")))) == ["one"]


def test_folders_globs_and_mixed_kinds(tmp_path):
    """A folder: every data file below it, sorted by path, each by its own format; other files skipped."""
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    write_source(folder, "parquet", DOCS[:3], "a")
    write_source(folder, "csv", DOCS[3:5], "b")
    write_source(folder, "txt", DOCS[5:7], "d")
    write_source(folder / "sub", "jsonl", DOCS[7:], "c")  # sub/c.jsonl sorts after d.txt
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.txt").write_text("not data either")
    assert list(iter_documents(Data(dataset=str(folder)))) == DOCS
    assert list(iter_documents(Data(dataset=str(folder / "*.parquet")))) == DOCS[:3]
    assert list(iter_documents(Data(dataset=str(folder / "**" / "*.jsonl")))) == DOCS[7:]


def test_glob_characters_in_folder_names_are_names(tmp_path):
    """runs/exp[1] is a folder, not a pattern: it is read, and its content keys the token cache."""
    folder = tmp_path / "runs" / "exp[1]"
    folder.mkdir(parents=True)
    write_source(folder, "txt", DOCS)
    (tmp_path / "runs" / "exp1").mkdir()  # what the pattern exp[1] would match instead
    write_source(tmp_path / "runs" / "exp1", "txt", ["decoy"])
    assert list(iter_documents(Data(dataset=str(folder)))) == DOCS
    assert list(iter_documents(Data(dataset=str(folder / "docs.txt")))) == DOCS
    gpt2 = load_tokenizer("gpt2")
    key = cache_key(Data(dataset=str(folder), val_docs=2), "train", gpt2)
    (folder / "docs.txt").write_text("changed\n")
    assert cache_key(Data(dataset=str(folder), val_docs=2), "train", gpt2) != key


def test_records_keep_where_they_came_from(tmp_path):
    assert [w for w, _ in iter_records(Data(dataset=str(write_source(tmp_path, "jsonl"))))][:2] == [
        f"{tmp_path}/docs.jsonl:1", f"{tmp_path}/docs.jsonl:2"]
    assert next(iter_records(Data(dataset=str(write_source(tmp_path, "json")))))[0] == f"{tmp_path}/docs.json[0]"
    where, row = next(iter_records(Data(dataset=str(write_source(tmp_path, "parquet")))))
    assert where == f"{tmp_path}/docs.parquet row 0" and row == {"text": DOCS[0], "n": 0}
    train, val, how = split_records(Data(dataset=str(write_source(tmp_path, "csv")), val_docs=2))
    assert [r["n"] for _, r in train] == list(range(6)) and [r["n"] for _, r in val] == [6, 7]
    assert "last 2 records" in how


@pytest.mark.parametrize("builder", ["json", "text", "parquet"])
def test_hugging_face_datasets_code_path_offline(tmp_path, builder):
    """The same load_dataset(...) call a Hub dataset uses, fed with local files: downloaded, then streamed."""
    import datasets

    docs = [f"document number {i}" for i in range(10)]
    path = tmp_path / f"docs.{ {'json': 'jsonl', 'text': 'txt', 'parquet': 'parquet'}[builder] }"
    if builder == "json":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif builder == "text":
        write_lines(path, docs)
    else:
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    data = Data(dataset=builder, data_files=str(path), val_docs=3)
    assert list(iter_documents(data)) == docs
    train, val, how = split_documents(data)
    assert list(val) == docs[7:] and list(train) == docs[:7] and "last 3 documents" in how
    streamed = Data(dataset=builder, data_files=str(path), val_docs=3, streaming=True)
    train, val, how = split_documents(streamed)  # a stream's end is unknown: its FIRST val_docs
    assert list(val) == docs[:3] and list(train) == docs[3:]
    assert "the first 3 documents" in how and "streamed" in how


def test_saved_dataset_dict_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:6]}),
                          "test": datasets.Dataset.from_dict({"text": DOCS[6:]})}).save_to_disk(str(tmp_path / "dd"))
    train, val, how = split_documents(Data(dataset=str(tmp_path / "dd"), val_split="test"))
    assert list(train) == DOCS[:6] and list(val) == DOCS[6:] and how == "validation = split 'test' (its first 50 documents)"
    with pytest.raises(UsageError, match="has no split 'validation'"):
        list(iter_documents(Data(dataset=str(tmp_path / "dd"), split="validation")))
    plain = write_source(tmp_path, "saved")  # a saved Dataset has no splits: validating on "test" would be training
    with pytest.raises(UsageError, match="has no named splits"):
        split_documents(Data(dataset=str(plain), val_split="test"))


# --- bad input: one line naming the file and the place -----------------------------------------


def bad_file(folder, name, content: bytes):
    path = folder / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", b"caf\xe9\nok\n", r"latin1\.txt:1: not UTF-8 text \(byte 0xe9\)"),
    ("image.txt", b"\x89PNG\r\n\x1a\n", r"image\.txt:1: not UTF-8 text \(byte 0x89\)"),
    ("zeros.txt", b"line one\nline\x00two\n", r"zeros\.txt:2: binary data \(a NUL byte\)"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl:2: not UTF-8 text"),
    ("list.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"list\.jsonl:2: expected a JSON object with a 'text' field, got \[1, 2\]"),
    ("number.jsonl", b'7\n', r"number\.jsonl:1: expected a JSON object with a 'text' field, got 7"),
    ("null.jsonl", b'{"text": null}\n', r"null\.jsonl:1: field 'text' is null, not a string"),
    ("int.jsonl", b'{"text": 42}\n', r"int\.jsonl:1: field 'text' is 42, not a string"),
    ("nofield.jsonl", b'{"body": "x"}\n', r"nofield\.jsonl:1: no field 'text' \(set data\.text_field\)"),
    ("broken.jsonl", b'{"text": "ok"}\nnot json\n', r"broken\.jsonl:2: not valid JSON"),
    ("broken.json", b'[{"text": "ok"},\n {"text": }]', r"broken\.json:2: not valid JSON"),
    ("fake.parquet", b"PAR1 this is not parquet", r"fake\.parquet: not a readable parquet file"),
    ("latin1.csv", b"text\ncaf\xe9\n", r"latin1\.csv: not a readable csv file"),
])
def test_bad_data_files_are_one_line(tmp_path, name, content, message):
    path = bad_file(tmp_path, name, content)
    with pytest.raises(UsageError, match=message) as error:
        list(iter_documents(Data(dataset=str(path))))
    assert "\n" not in str(error.value)


def test_bad_sources_are_one_line(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no data here")
    cases = [
        (str(tmp_path / "nope" / "corpus.txt"), r"dataset file not found: .*corpus\.txt \(check data\.dataset\)"),
        (str(tmp_path / "*"), r"data\.dataset pattern .* matches the folder .*empty: a pattern must match files"),
        (str(tmp_path / "*.parquet"), r"no file matches data\.dataset pattern .*\*\.parquet"),
        (str(tmp_path / "empty"), r"no data files \(\.txt, \.jsonl, \.json, \.parquet, \.csv\) in folder .*empty"),
    ]
    for source, message in cases:
        with pytest.raises(UsageError, match=message):
            split_documents(Data(dataset=source))  # checked at once, before anything is read
    with pytest.raises(UsageError, match=r"data\.val_dataset pattern"):
        split_documents(Data(dataset=str(write_source(tmp_path, "txt")), val_dataset=str(tmp_path / "*")))


def test_plain_text_holds_no_records(tmp_path):
    path = write_source(tmp_path, "txt")
    with pytest.raises(UsageError, match=r"docs\.txt is plain text, not records"):
        list(iter_records(Data(dataset=str(path))))


# --- the held-out split ------------------------------------------------------------------------


def test_local_validation_is_the_last_documents_and_never_overlaps(tmp_path):
    docs = [f"doc {i}" for i in range(10)]
    path = write_lines(tmp_path / "c.txt", docs)
    train, val, how = split_documents(Data(dataset=str(path), val_docs=3))
    train, val = list(train), list(val)
    assert val == docs[7:] and train == docs[:7]
    assert not set(train) & set(val)
    assert how == f"validation = the last 3 documents of {path}; training = the documents before them"


def test_parts_are_lazy_and_independent(tmp_path, monkeypatch):
    """Each part reads the source only when iterated; val is right whether training was read, capped or skipped."""
    docs = [f"doc {i}" for i in range(10)]
    path = write_lines(tmp_path / "c.txt", docs)
    calls = []
    real = sources.read_text
    monkeypatch.setattr(sources, "read_text", lambda p: calls.append(p) or real(p))
    train, val, _ = split_documents(Data(dataset=str(path), val_docs=3))
    assert calls == []  # nothing read yet
    assert list(val) == docs[7:] and len(calls) == 1  # val alone (eval_val.py, or training's tokens cached)
    train, val, how = split_documents(Data(dataset=str(path), val_docs=3, train_docs=4))
    assert list(train) == docs[:4] and list(val) == docs[7:]  # capped training: val reads to the end itself
    assert how.endswith("(at most 4)")
    train, val, _ = split_documents(Data(dataset=str(path), val_docs=3))
    calls.clear()
    assert list(train) == docs[:7] and list(val) == docs[7:] and len(calls) == 1  # one pass serves both


def test_training_lags_the_reader_by_exactly_val_docs(tmp_path):
    """HoldOutLast never holds more than val_docs items: each training item is handed out as soon as val_docs
    newer ones have been read, and val reuses the ones left when training reached the end (one pass)."""
    data = Data(dataset="counted", val_docs=3)
    produced = []

    def read(data):
        for i in range(10):
            produced.append(i)
            yield i
    held_out = HoldOutLast(read, data, "items")
    seen = []
    for item in held_out.train():
        assert len(produced) - len(seen) == 4  # this item and the 3 read after it, nothing more
        seen.append(item)
    assert seen == list(range(7)) and list(held_out.val()) == [7, 8, 9] and len(produced) == 10


def test_records_are_split_by_the_same_rule_as_documents(tmp_path):
    source = write_source(tmp_path, "jsonl")
    other = str(write_source(tmp_path, "csv"))
    for settings in ({"val_docs": 3}, {"val_docs": 3, "train_docs": 2}, {"val_dataset": other}):
        texts = [list(part) for part in split_documents(Data(dataset=str(source), **settings))[:2]]
        records = [[r["text"] for _, r in part] for part in split_records(Data(dataset=str(source), **settings))[:2]]
        assert records == texts, settings
    how = split_records(Data(dataset=str(source), val_docs=3))[2]
    assert how == f"validation = the last 3 records of {source}; training = the records before them"


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
    train, val, _ = split_documents(Data(dataset=str(path), val_docs=5))
    with pytest.raises(UsageError, match=r"has 2 documents, not more than data\.val_docs=5"):
        list(train)
    with pytest.raises(UsageError, match=r"has 2 documents, not more than data\.val_docs=5"):
        list(val)


def test_a_folder_laid_out_like_a_hub_dataset_keeps_its_splits(tmp_path):
    """`hf download --local-dir` leaves a dataset card and one file per split: the test split is not training text."""
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: train.jsonl\n  - split: test\n    path: test.jsonl\n---\n# card\n")
    write_source(folder, "jsonl", DOCS[:6], "train")
    write_source(folder, "jsonl", DOCS[6:], "test")
    train, val, _ = split_documents(Data(dataset=str(folder), val_docs=2))
    assert list(train) == DOCS[:4] and list(val) == DOCS[4:6]  # split "train" only, its last 2 held out
    train, val, _ = split_documents(Data(dataset=str(folder), val_split="test", val_docs=0))
    assert list(train) == DOCS[:6] and list(val) == DOCS[6:]
    (folder / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \x89\n')  # damaged after the download
    with pytest.raises(UsageError, match=r"could not load dataset .*downloaded' split 'train': .*check data\.dataset"):
        list(iter_documents(Data(dataset=str(folder))))


def test_validation_on_the_training_source_is_refused(tmp_path):
    path = write_source(tmp_path, "txt")
    with pytest.raises(UsageError, match="data.val_dataset is data.dataset"):
        split_documents(Data(dataset=str(path), val_dataset=str(tmp_path / "." / "docs.txt")))


def test_an_unreadable_file_is_one_line(tmp_path):
    write_source(tmp_path, "txt", ["readable"], "a")
    os.symlink(tmp_path / "moved_away.txt", tmp_path / "b.txt")  # a broken link in a data folder
    with pytest.raises(UsageError, match=r"cannot read .*b\.txt \(No such file or directory\): check the file"):
        list(iter_documents(Data(dataset=str(tmp_path))))
