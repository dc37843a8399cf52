"""Where the text comes from: document sources, the Hugging Face Hub, and the held-out split.

    train, val, how = split_documents(cfg.data)  # two lazy iterables of texts + a sentence saying how
    next(iter(val))                               # the first validation document, a string
    train, val, how = split_records(cfg.data)     # the same split, as (where, record) pairs (finetune.py)

Read `split_documents` first: it is the one definition of the held-out set, for every kind of source.
Sources (`data.dataset`, `data.val_dataset`): a local .txt, .jsonl, .json, .parquet or .csv file, a folder
of them (read in sorted path order, each file by its own format, other files skipped), a glob, a folder
written by `datasets.save_to_disk` or laid out like a Hub dataset (a README.md dataset card), a `datasets`
builder with `data.data_files`, or a Hub dataset name. `is_hub_name` is the one rule that tells a Hub name
from a local path; offline, a Hub name is read from the local cache only.
"""

import collections
import contextlib
import glob
import itertools
import json
import os
import re
import socket
from typing import Iterator

from cli import UsageError, decode_text, first_line_of, open_file, read_text

# ---------------------------------------------------------------------------------------------
# The held-out split: one rule, for documents and records alike
# ---------------------------------------------------------------------------------------------


def split_documents(data):
    """(train, val, description): the one definition of the held-out set, the same for every kind of source.

    - `val_dataset` set: validation is all of that source, training all of `dataset`.
    - `val_split` set (a Hub or saved dataset with named splits): validation is that split (its first
      `val_docs` documents when val_docs > 0), training all of `split`.
    - otherwise validation is the LAST `val_docs` documents of `dataset` and training every document before
      them: a .txt line, a JSON record, a parquet/csv row, a dataset row alike, wherever they come from.
      The one exception is a streamed dataset (data.streaming: true), whose end is not known until it has
      all been downloaded: it holds out its FIRST `val_docs` documents, and training starts after them.
    `train_docs` caps the training documents. Both parts are lazy: nothing is read until a part is iterated
    (a run whose tokens are cached reads no text), and neither part holds more than val_docs documents
    in memory. `data` is the config's `data` section.
    """
    return _split(data, iter_documents, "documents")


def split_records(data):
    """split_documents, item for item, as (where, record) pairs of iter_records (finetune.py's examples)."""
    return _split(data, iter_records, "records")


def _split(data, read, noun: str):
    """split_documents over the items of read(data, source, split): iter_documents or iter_records."""
    folder = os.path.expanduser(data.dataset)
    has_splits = (bool(data.data_files) or is_hub_name(data.dataset) or _is_dataset_repo(folder)
                  or os.path.isfile(os.path.join(folder, "dataset_dict.json")))  # a saved DatasetDict; not a Dataset
    if data.val_dataset and os.path.realpath(os.path.expanduser(data.val_dataset)) == os.path.realpath(folder):
        raise UsageError(f"data.val_dataset is data.dataset ({data.dataset}): validation would be training text; "
                         "leave data.val_dataset out to hold out data.val_docs documents, or name another source")
    if data.val_dataset:
        return (itertools.islice(read(data), data.train_docs), read(data, data.val_dataset),
                f"validation = all of {data.val_dataset}")
    if data.val_split and not has_splits:
        raise UsageError(f"data.val_split (eval_val.py --split) names a split, but {data.dataset} has no named "
                         f"splits (local files; only Hub datasets, builders and saved DatasetDicts have them): hold "
                         f"out {noun} with data.val_docs, or name a file with data.val_dataset")
    if data.val_split:
        val = itertools.islice(read(data, split=data.val_split), data.val_docs or None)
        first = f" (its first {data.val_docs} {noun})" if data.val_docs else ""
        return itertools.islice(read(data), data.train_docs), val, f"validation = split {data.val_split!r}{first}"
    if data.streaming and (data.data_files or is_hub_name(data.dataset)):
        val = itertools.islice(read(data), data.val_docs)
        train = itertools.islice(read(data), data.val_docs, None)
        if data.shuffle_buffer:
            train = _shuffled_stream(train, data.shuffle_buffer, seed=0)
        return (itertools.islice(train, data.train_docs), val,
                f"validation = the first {data.val_docs} {noun} of {data.dataset} split {data.split!r} (streamed: "
                "its end is unknown); training starts after them")
    held_out = HoldOutLast(read, data, noun)
    return (itertools.islice(held_out.train(), data.train_docs), held_out.val(),
            f"validation = the last {data.val_docs} {noun} of {data.dataset}; training = the {noun} before them"
            + (f" (at most {data.train_docs})" if data.train_docs else ""))


class HoldOutLast:
    """The last data.val_docs items of data.dataset held out: train() yields every item before them, val() them.

    train() runs n items behind the reader, so the n items it still holds when the source ends are the
    validation set: it keeps them in `self.tail`, and val() hands them out without reading anything again.
    When training did not read to the end (train_docs capped it, or its tokens came from the cache and it
    was never read at all) val() reads the source itself, keeping only the last n items.
    """

    def __init__(self, read, data, noun: str):
        self.read, self.data, self.noun, self.n = read, data, noun, data.val_docs
        self.opened = read(data)  # opened now: a missing file or an unreachable Hub fails before anything is read
        self.tail = None  # the last n items, once train() has read the source to its end

    def train(self) -> Iterator:
        held, count = collections.deque(), 0
        for count, item in enumerate(self._items(), 1):
            held.append(item)
            if len(held) > self.n:
                yield held.popleft()
        self._check(count)
        self.tail = list(held)

    def val(self) -> Iterator:
        if self.tail is not None:  # checked when val is first iterated, not when it is made
            yield from self.tail
            return
        held, count = collections.deque(maxlen=self.n), 0
        for count, item in enumerate(self._items(), 1):
            held.append(item)
        self._check(count)
        yield from held

    def _items(self) -> Iterator:
        """The source's items: the reader opened in __init__ the first time, a new reader after that."""
        if self.opened is None:
            return self.read(self.data)
        items, self.opened = self.opened, None
        return items

    def _check(self, count: int) -> None:
        if count <= self.n:
            raise UsageError(f"{self.data.dataset} has {count} {self.noun}, not more than data.val_docs={self.n}: "
                             "add text or lower data.val_docs")


def _shuffled_stream(docs: Iterator[str], buffer_size: int, seed: int) -> Iterator[str]:
    """Approximate shuffle of a stream: keep a buffer, emit a random element, refill its slot."""
    import torch  # its generator, so a seed gives the order it always gave

    generator = torch.Generator().manual_seed(seed)
    buffer = []
    for doc in docs:
        if len(buffer) < buffer_size:
            buffer.append(doc)
            continue
        i = int(torch.randint(len(buffer), (1,), generator=generator))
        yield buffer[i]
        buffer[i] = doc
    order = torch.randperm(len(buffer), generator=generator).tolist()
    yield from (buffer[i] for i in order)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub: one rule for "Hub name or local path", offline that is offline
# ---------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")  # the files a data folder contributes
TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}  # read through `datasets`; .txt/.jsonl/.json are read here
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `name` or `owner/name`


def is_hub_name(name: str) -> bool:
    """True when `name` can only mean a Hugging Face Hub repository; false for anything local.

    A Hub name is `name` or `owner/name` with nothing on disk by that name. Everything else (an existing
    file or folder, a path starting with `.`, `/` or `~`, more than one slash, glob characters, a data
    file extension) is a local path, so a missing file says "not found" instead of asking the Hub.
    """
    return not os.path.exists(name) and _HUB_NAME.fullmatch(name) is not None and not name.endswith(DATA_SUFFIXES)


def is_offline(offline: bool = False) -> bool:
    """data.offline, or HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) set in the
    environment: read now, not when huggingface_hub was imported."""
    return offline or any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
                          for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Fail within seconds, in one line, when the Hub cannot be reached (instead of a long retry loop)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
    except OSError:
        raise UsageError(f"cannot reach the Hugging Face Hub ({host}) to load {what}: connect to the internet, "
                         "or use a local path / cached copy with data.offline: true (HF_HUB_OFFLINE=1)") from None


def cached_snapshot(name: str, repo_type: str, what: str) -> str:
    """The folder of a Hub repository in the local Hugging Face cache, found without any network call.

    Offline loading goes through this folder (a plain local path for `datasets` and `transformers`), so no
    library ever decides on its own to retry the network: huggingface_hub reads HF_HUB_OFFLINE only when
    it is imported, which Lightning does before any config is read.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except LocalEntryNotFoundError as e:
        if getattr(e, "snapshot_path", None):  # a partial download: use what is there, the loader says what is missing
            return e.snapshot_path
        local = "folder" if what == "tokenizer" else "file"
        raise UsageError(f"{what} {name!r} not found in the local cache (offline mode): download it once online "
                         f"(data.offline: false), or use a local {local}") from None


# ---------------------------------------------------------------------------------------------
# Documents and records: every source goes through iter_documents / iter_records
# ---------------------------------------------------------------------------------------------


def iter_documents(data, source: str | None = None, split: str | None = None) -> Iterator[str]:
    """Every document of a source, in order, as a string. `data` is the config's `data` section.

    A .txt file splits by data.txt_documents (line, paragraph, file); a record gives its data.text_field.
    The source is checked now; it is read as the result is iterated.
    """
    source, split = source or data.dataset, split or data.split
    parts = _parts(data, source)

    def documents(kind, path):
        if kind == "text":
            yield from _text_documents(path, data.txt_documents)
        else:
            for where, record in _records(data, kind, path, split, source):
                yield _text_of(where, record, data.text_field)

    return (doc for kind, path in parts for doc in documents(kind, path))


def iter_records(data, source: str | None = None, split: str | None = None) -> Iterator[tuple[str, object]]:
    """Every record of a source, in order, as (where, record): JSON values of .jsonl/.json files, rows of
    .parquet/.csv files and datasets. `where` ("file:line", "file[i]", "file row i", "name row i", counted
    from 0 except lines) names the record in messages. Plain-text files hold no records: a UsageError.
    The source is checked now; it is read as the result is iterated.
    """
    source, split = source or data.dataset, split or data.split
    parts = _parts(data, source)
    return (item for kind, path in parts for item in _records(data, kind, path, split, source))


def _parts(data, source: str) -> list[tuple[str, str]]:
    """What a source consists of, checked without reading it: [(kind, path or name), ...] in reading order.

    kind: "text" (.txt and any other suffix: plain text), "json" (.jsonl, .json), "table" (.parquet, .csv),
    "saved" (a save_to_disk folder), "repo" (a local folder laid out like a Hub dataset), "datasets" (a Hub
    dataset, or a builder reading data.data_files).
    A Hub name is checked here, so a mistake fails in seconds: reachable online, in the local cache offline.
    """
    key = "data.dataset" if source == data.dataset else "data.val_dataset"
    local = os.path.expanduser(source)
    if source == data.dataset and data.data_files:
        return [("datasets", source)]
    if _is_saved_dataset(local):
        return [("saved", local)]
    if _is_dataset_repo(local):
        return [("repo", local)]
    if not is_hub_name(source):
        files = _local_files(local, key)
        return [("json" if p.endswith((".jsonl", ".json")) else "table" if p.endswith(tuple(TABLE_BUILDERS))
                 else "text", p) for p in files]
    if is_offline(data.offline):
        return [("datasets", cached_snapshot(source, "dataset", "dataset"))]
    check_hub_reachable(f"dataset {source!r}")
    return [("datasets", source)]


def _local_files(source: str, key: str) -> list[str]:
    """The files a local source names: the file itself, a folder's data files (recursively), or a glob's matches."""
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files = [p for p in _files_under(source) if p.endswith(DATA_SUFFIXES)]
        if not files:
            raise UsageError(f"no data files ({', '.join(DATA_SUFFIXES)}) in folder {source}: check {key}")
        return files
    if any(c in source for c in "*?["):  # a pattern written by the user: the one place a data path is globbed
        matches = sorted(glob.glob(source, recursive=True))
        folders = [p for p in matches if os.path.isdir(p)]
        if folders:
            raise UsageError(f"{key} pattern {source!r} matches the folder {folders[0]}: a pattern must match files "
                             f"(e.g. {os.path.join(folders[0], '*.txt')}), or name the folder itself")
        if not matches:
            raise UsageError(f"no file matches {key} pattern {source!r}: check the pattern")
        return matches
    raise UsageError(f"dataset file not found: {source} (check {key})")


def source_files(source: str | None) -> list[str] | None:
    """Every local file a source names (a file, a folder, a glob, a saved dataset), in reading order; None for a
    Hub name or anything that is not there. The token cache knows a local source by these files' bytes."""
    if not source or is_hub_name(source):
        return None
    if _is_saved_dataset(source) or _is_dataset_repo(source):
        return _files_under(source)
    try:
        return _local_files(os.path.expanduser(source), "data.dataset")
    except UsageError:  # e.g. data_files that name remote files: the name is the key
        return None


def _files_under(folder: str) -> list[str]:
    """Every file below `folder`, recursively, in sorted order; hidden files and folders (.name) are skipped.

    Walked, not globbed: a folder named `exp[1]` is a folder, not a pattern.
    """
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(found)


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _is_dataset_repo(path: str) -> bool:
    """A folder laid out like a Hub dataset (a README.md dataset card starting with `---`, as `hf download
    --local-dir` leaves it): `datasets` reads it with its configs and splits, so its test split stays out."""
    card = os.path.join(path, "README.md")
    if not os.path.isfile(card):
        return False
    with open_file(card) as f:
        return f.read(4) in (b"---\n", b"---\r")


def _text_documents(path: str, txt_documents: str) -> Iterator[str]:
    text = read_text(path)
    if txt_documents == "file":
        parts = [text]
    elif txt_documents == "paragraph":
        parts = text.split("\n\n")
    else:
        parts = text.splitlines()
    yield from (p.strip() for p in parts if p.strip())


def _text_of(where: str, record, text_field: str) -> str:
    """The document text of one record, checked: a JSON object whose text_field is a string."""
    if not isinstance(record, dict):
        got = json.dumps(record, default=str)[:60]
        raise UsageError(f"{where}: expected a JSON object with a {text_field!r} field, got {got}")
    if text_field not in record:
        raise UsageError(f"{where}: no field {text_field!r} (set data.text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise UsageError(f"{where}: field {text_field!r} is {json.dumps(text, default=str)[:40]}, not a string: "
                         "fix the record, or set data.text_field")
    return text


def _records(data, kind: str, path: str, split: str, label: str) -> Iterator[tuple[str, object]]:
    if kind == "text":
        raise UsageError(f"{path} is plain text, not records: records come from .jsonl/.json/.parquet/.csv files "
                         "or a dataset (check data.dataset)")
    if kind == "json":
        yield from _json_records(path)
    elif kind == "table":
        yield from _table_records(path)
    else:
        yield from _dataset_rows(data, kind, path, split, label)


def _json_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) of a .jsonl file (one JSON value per line) or a .json file (a JSON array, or JSON Lines)."""
    with open_file(path) as f:
        if path.endswith(".json") and f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            f.seek(0)
            try:
                records = json.loads(decode_text(f.read(), path))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            yield from ((f"{path}[{i}]", record) for i, record in enumerate(records))
            return
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            line = decode_text(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{lineno}: not valid JSON (expected one object per line, or a .json "
                                 "file holding one JSON array)") from None


def _table_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) of a .parquet or .csv file, read by `datasets` (streamed: no copy lands in its cache)."""
    import datasets  # slow import: only for parquet/csv files and datasets

    builder = TABLE_BUILDERS[os.path.splitext(path)[1]]
    with _datasets_errors(f"{path}: not a readable {builder} file ({{error}}): check the file"):
        rows = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
        yield from ((f"{path} row {i}", row) for i, row in enumerate(rows))


def _dataset_rows(data, kind: str, path: str, split: str, label: str) -> Iterator[tuple[str, dict]]:
    """(where, row) of a saved dataset folder, a local Hub-layout folder, a builder over data.data_files, or a Hub
    dataset (by name, or its folder in the local cache)."""
    import datasets  # slow import: only for datasets

    with _datasets_errors(f"could not load dataset {label!r} split {split!r}: {{error}} (check data.dataset/config/"
                          "split, or use a local file)"):
        if kind == "saved":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UsageError(f"saved dataset {path} has no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
        else:  # a local folder is streamed (read in place, no copy in the datasets cache); the Hub as configured
            ds = datasets.load_dataset(path, data.config, split=split, streaming=data.streaming or kind == "repo",
                                       data_files=data.data_files if label == data.dataset else None)
        yield from ((f"{label} row {i}", row) for i, row in enumerate(ds))


@contextlib.contextmanager
def _datasets_errors(message: str):
    """What `datasets` (or pyarrow and pandas under it) raises while loading or reading, as one UsageError line:
    message.format(error=its first line). Its own log line for the same error is silenced meanwhile."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:  # OSError: also ConnectionError, FileNotFound
        raise UsageError(message.format(error=first_line_of(e))) from None
    finally:
        datasets.logging.set_verbosity(verbosity)
