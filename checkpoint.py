"""Checkpoint files (writing, reading, checking, migrating), shared by every script.

A `.ckpt` file is a `torch.save`d dict written by training.py (through Lightning Fabric) or by
convert.py. Every script reads the same entries:

    state_dict  model weights, named as in model.Transformer.state_dict()
    meta        plain data: kind ("pretrain" | "sft"), step, epoch, tokens_seen, train_loss,
                val_loss, n_params, model_config, config (the full YAML config), tokenizer (its name)
                and tokenizer_sha256 (its content)
    tokenizer   the tokenizer itself (its tokenizer.json text and EOS token), so that a checkpoint
                works anywhere, offline, with nothing beside it (see tokenizer.tokenizer_for_checkpoint)

A checkpoint a run resumes from (the periodic `epoch=E-step=S.ckpt` ones) also holds the optimizer's state
(under the optimizer's name, e.g. "adamw"), the random generator's state ("rng") and, inside meta,
"train_state": what resuming needs. best.ckpt and final.ckpt hold the weights only (training.save).
A LoRA run's checkpoints also hold its adapters (meta["lora"]; see lora.py), merged as they are loaded.

Writes are atomic (temporary file, fsync, rename), so a killed process never leaves a truncated
checkpoint under a good name. Reads check everything before any script uses a file: the zip archive's
own CRCs (so corrupted bytes are caught, not turned into garbage text), `weights_only=True` (loading a
file can never run code from it), a meta that describes a model, and weights of exactly that model.
A file from before the model padded its own vocabulary is migrated as it is read (load_checkpoint):
every script sees today's format.

Next to each checkpoint, `NAME.ckpt.json` repeats `meta` (so list.py can show a folder without importing
torch) together with the checkpoint's fingerprint, a hash of its zip directory (every entry's name, size
and CRC). A sidecar is used only when the fingerprint matches the file beside it: a renamed, replaced or
rewritten checkpoint can never be described by a stale sidecar. torch is imported only where needed.
"""

import hashlib
import json
import os
import shutil
import zipfile

from cli import UsageError

META_SUFFIX = ".json"


# ---------------------------------------------------------------------------------------------
# Writing: atomic, with the sidecar
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    The one way this project writes a file that must never be seen half-written: checkpoints, their
    sidecars, token caches, tokenizers.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Atomically write a checkpoint dict, then its sidecar (meta + the written file's fingerprint)."""
    import torch

    atomic_write(path, lambda f: torch.save(checkpoint, f))
    meta = checkpoint.get("meta")
    if meta is not None:
        sidecar = {"fingerprint": fingerprint(path), "meta": meta}
        atomic_write(path + META_SUFFIX, lambda f: f.write(json.dumps(sidecar, indent=1, default=str).encode()))


def link_checkpoint(src: str, dst: str) -> None:
    """Make dst (and its sidecar) the same file as src: a hard link, or a copy where links are not supported.

    Written through atomic_write's rule (a temporary name, then a rename), so dst is never missing or partial.
    """
    for suffix in ("", META_SUFFIX):
        tmp = f"{dst}{suffix}.tmp{os.getpid()}"
        try:
            os.link(src + suffix, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(src + suffix, tmp)
        os.replace(tmp, dst + suffix)
    _fsync_dir(dst)


# ---------------------------------------------------------------------------------------------
# Reading: checked, safe
# ---------------------------------------------------------------------------------------------


def fingerprint(path: str) -> str | None:
    """A hash of a checkpoint's zip directory (each entry's name, size and CRC-32), or None if it is no zip.

    Cheap (only the directory at the end of the file is read) and different for any two checkpoints
    whose contents differ: what ties a sidecar to the checkpoint it describes.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = sorted((i.filename, i.file_size, i.CRC) for i in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _verify_archive(path: str) -> None:
    """Read every entry of the zip archive torch.save wrote and check its CRC-32: corrupted bytes are refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return  # not a zip at all: torch.load says so below
    except (OSError, ValueError, EOFError, zipfile.LargeZipFile) as e:
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}): pick another file") from None
    if bad is not None:
        raise UsageError(f"{path} is corrupted (the bytes of {bad.split('/')[-1]!r} fail their checksum): "
                         "pick another checkpoint, e.g. an earlier epoch=...-step=... file")


def load_checkpoint(path: str, mmap: bool = True, merge_lora: bool = True) -> dict:
    """Load and check a checkpoint (tensors and plain data only), memory-mapped so unused tensors cost nothing.

    A LoRA run's checkpoint (meta["lora"], lora.py) comes back merged, the state dict of a plain Transformer
    and the settings moved to meta["merged_lora"]: what every script that runs a model needs. merge_lora=False
    keeps the adapters apart (resuming that run, exporting them with `convert.py to-peft`).

    Every problem is a UsageError naming the file: missing, not a checkpoint, corrupted, holding Python
    objects, or a meta that describes no model. (Whether the weights fit that model is checked where they
    are used: load_weights when a model is built, check_weights when none is.)
    """
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path} (train one first, or check the path with `python list.py`)")
    _verify_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UsageError(f"{path} holds Python objects beyond tensors and plain data; refusing to load it "
                             "because unpickling could run code (only use checkpoints from this project)") from None
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt): pick another file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated, corrupt or not a .ckpt file): "
                         f"pick another file [{type(e).__name__}]") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "meta" not in ckpt:
        raise UsageError(f"{path} is not a Tiny Transformer checkpoint (no state_dict/meta): "
                         "use a .ckpt written by train.py, finetune.py or convert.py")
    config = model_config_of(ckpt["meta"], path)
    if config.vocab_size % 64 == 0:  # only then can it be an old file's padded row count (see model_config_of)
        config = model_config_of(ckpt["meta"], path, stored_tokenizer_size(ckpt, path))
    ckpt["meta"]["model_config"]["vocab_size"] = config.vocab_size  # what every reader of this dict sees
    ckpt["state_dict"] = fit_vocab_rows(ckpt["state_dict"], config)
    if merge_lora and ckpt["meta"].get("lora"):
        from lora import merge_state_dict

        ckpt["state_dict"] = merge_state_dict(ckpt["state_dict"], ckpt["meta"]["lora"], path)
        ckpt["meta"]["merged_lora"] = ckpt["meta"].pop("lora")
    return ckpt


def model_config_of(meta, where: str, tokenizer_size: int | None = None):
    """The model.ModelConfig a checkpoint's meta describes, or a UsageError saying the meta is broken.

    Checkpoints from before the model padded its own vocabulary stored the padded row count as
    vocab_size (e.g. 50304 for GPT-2's 50257 tokens). Given the size of the checkpoint's tokenizer,
    vocab_size is read as min(stored, tokenizer_size): the tokenizer's size for those files, unchanged
    for newer ones (their vocab_size is the tokenizer's size already). Without it the stored value stands.
    """
    from model import ModelConfig

    try:
        fields = dict(meta["model_config"])
        if tokenizer_size is not None and isinstance(fields.get("vocab_size"), int):
            fields["vocab_size"] = min(fields["vocab_size"], tokenizer_size)
        return ModelConfig(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where}: its meta does not describe a model ({type(e).__name__}: {str(e)[:80]}): "
                         "the file is damaged or was not written by this project") from None


def stored_tokenizer_size(ckpt: dict, where: str) -> int | None:
    """Tokens of the tokenizer a checkpoint carries (added tokens included), or None if it carries none."""
    saved = ckpt.get("tokenizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("tokenizer_json"), str):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(saved["tokenizer_json"]).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # a damaged entry: `tokenizers` raises a bare Exception
        raise UsageError(f"{where}: the tokenizer stored in it is damaged ({str(e).splitlines()[0][:80]}): "
                         "the file is damaged or was not written by this project") from None


def fit_vocab_rows(state_dict: dict, config) -> dict:
    """state_dict with the embedding and head cut or zero-padded to config.padded_vocab_size rows.

    Lossless: rows past the tokenizer's vocabulary are never an input nor a target. For checkpoints padded
    by another rule and for imported models (Hugging Face stores exactly one row per token). Tied weights
    stay one tensor.
    """
    import torch

    def fit(weight):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == rows:
            return weight  # absent, damaged (check_weights names it) or already the right size
        if weight.shape[0] > rows:
            return weight[:rows]
        return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])

    rows = config.padded_vocab_size
    fitted = dict(state_dict)
    for name in ("embed.weight", "lm_head.weight"):
        if name in fitted:
            fitted[name] = fit(fitted[name])
    if config.tie_embeddings and "embed.weight" in fitted and "lm_head.weight" in fitted:
        fitted["lm_head.weight"] = fitted["embed.weight"]  # one tensor, as in the model
    return fitted


def check_weights(state_dict: dict, config, where: str) -> None:
    """Every parameter the model of `config` needs is in state_dict, with its shape, and nothing else.

    For scripts that use weights without building the model (convert.py, finetune.py --dry-run): the model
    is built on the meta device, which holds shapes only (its first use imports more of torch).
    """
    import torch

    from model import Transformer

    with torch.device("meta"):
        want = Transformer(config).state_dict()
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    wrong = [f"{k} {tuple(getattr(state_dict[k], 'shape', ()))} != {tuple(v.shape)}" for k, v in want.items()
             if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(v.shape)]
    if missing or extra or wrong:
        raise UsageError(f"{where}: the weights do not match the model its meta describes (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, wrong shape {wrong[:3]}): the file is damaged or not ours")


def load_weights(model, state_dict: dict, where: str, assign: bool = False) -> None:
    """model.load_state_dict, strict, with a mismatch (missing, unexpected or misshapen weights) as one line."""
    try:
        model.load_state_dict(state_dict, assign=assign)
    except RuntimeError as e:
        problem = " ".join(str(e).split())[:200]
        raise UsageError(f"{where}: the weights do not match the model its meta describes ({problem}): "
                         "the file is damaged or not ours") from None


def same_files(paths: list[str]) -> list[list[str]]:
    """The paths grouped by the file they name, in first-seen order: a checkpoint and its hard links (best.ckpt,
    last.ckpt and final.ckpt are often one file under several names) form one group. A path given twice counts once."""
    groups = {}  # (device, inode) -> the paths naming that file
    for path in paths:
        stat = os.stat(path)
        names = groups.setdefault((stat.st_dev, stat.st_ino), [])
        if path not in names:
            names.append(path)
    return list(groups.values())


def read_meta(path: str) -> dict:
    """A checkpoint's metadata: from its sidecar when the sidecar belongs to this very file, else from the file."""
    try:
        with open(path + META_SUFFIX, encoding="utf-8") as f:
            sidecar = json.load(f)
        if isinstance(sidecar, dict) and isinstance(sidecar.get("meta"), dict) and \
                sidecar.get("fingerprint") == fingerprint(path) is not None:
            return sidecar["meta"]
    except (OSError, ValueError):
        pass  # no sidecar, or a damaged one: the checkpoint itself holds the same meta
    return load_checkpoint(path, merge_lora=False)["meta"]


# ---------------------------------------------------------------------------------------------
