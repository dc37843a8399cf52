"""Tokens -> cache -> windows -> samplers: how documents become the (x, y) batches a model trains on.

    train_docs, val_docs, how = sources.split_documents(cfg.data)  # lazy texts (sources.py)
    tokens = load_tokens(train_docs, tok, cfg.data, "train")        # one flat tensor: doc, EOS, doc, EOS, ...
    windows = PackedWindows(tokens, seq_len=64)                      # (x, y) pairs of 64 tokens, y = x shifted by one
    x, y = windows[0]                                                # (64,) and (64,)

Read `PackedWindows` first: documents are joined with an EOS token between them (so the model learns where
a text ends) and cut into fixed windows of seq_len + 1 tokens; no padding is ever trained on.
`ShuffledPasses` and `StridedSampler` decide which window each step and each rank sees; `load_tokens`
tokenizes once and memory-maps the result on later runs.
"""

import dataclasses
import hashlib
import json
import os
import sys
from typing import Iterable

import torch
from torch.utils.data import Dataset, Sampler

from sources import source_files
from tokenizer import Tokenizer

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


def cache_key(data, part: str, tokenizer: Tokenizer) -> str:
    """The name of one tokenized corpus part in data.cache_dir: a hash of everything its token ids depend on.

    That is the text (local files by their content, so a renamed or moved file still hits; Hub datasets by
    name), every data setting that chooses or cuts documents, which part (train or val), and the tokenizer's
    full definition (its tokenizer.json, not its name). Change any of them and the key changes.
    """
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("cache_dir", "offline", "tokenizer_name")}
    for name in ("dataset", "val_dataset", "data_files"):
        files = source_files(settings[name])
        settings[name] = settings[name] if files is None else _sha256(files)
    record = json.dumps({"format": 2, "part": part, "data": settings, "tokenizer": tokenizer.sha256}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:24]


def load_tokens(docs: Iterable[str], tokenizer: Tokenizer, data, part: str) -> torch.Tensor:
    """tokenize_documents(docs), through the cache in data.cache_dir when it is set.

    `docs` is one part ("train" or "val") of split_documents(data). The first run tokenizes and writes
    KEY.bin (raw int32 token ids) and then KEY.json (what they are: count, sha256, vocabulary), each
    fsynced and renamed into place. Later runs check KEY.bin against KEY.json (its size, its sha256, its
    ids against the tokenizer) and memory-map it without reading
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


def _sha256(paths: list[str]) -> str:
    """One sha256 over the bytes of these files, each preceded by its length (so file boundaries count)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{os.path.getsize(path)}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
