"""Checkpoint files and device choice, shared by every script.

A `.ckpt` file is a `torch.save`d dict written by training.py (through Lightning Fabric) or by
convert.py. Every script reads the same two entries:

    state_dict  model weights, named as in model.Transformer.state_dict()
    meta        plain data: kind ("pretrain" | "sft"), step, epoch, tokens_seen, train_loss,
                val_loss, n_params, model_config, config (the full YAML config), tokenizer

A training checkpoint also holds the optimizer's state (under the optimizer's name, e.g. "adamw"), the
random generator's state ("rng") and, inside meta, "train_state": what resuming needs.

Writes are atomic (temporary file, fsync, rename), so a killed process never leaves a
truncated checkpoint under a good name. Reads use `weights_only=True`: loading a file can
never run code from it. Next to each checkpoint, `NAME.ckpt.json` repeats `meta` so that
list.py can show a folder of checkpoints without importing torch.
"""

import json
import os
import pickle
import shutil

import torch

from config import UsageError
from model import ModelConfig, Transformer

META_SUFFIX = ".json"


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


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Atomically write a checkpoint dict and its metadata sidecar."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    meta = checkpoint.get("meta")
    if meta is not None:
        atomic_write(path + META_SUFFIX, lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))


def load_checkpoint(path: str, mmap: bool = True) -> dict:
    """Load a checkpoint safely (tensors and plain data only), memory-mapped so unused tensors cost nothing."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path} (train one first, or check the path with `python list.py`)")
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
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise UsageError(f"{path} is not a Tiny Transformer checkpoint (no state_dict/meta): "
                         "use a .ckpt written by train.py, finetune.py or convert.py")
    return ckpt


def read_meta(path: str) -> dict:
    """A checkpoint's metadata, from its JSON sidecar when that is current, else from the file itself."""
    sidecar = path + META_SUFFIX
    if os.path.isfile(path) and os.path.isfile(sidecar) and os.path.getmtime(sidecar) >= os.path.getmtime(path):
        try:
            with open(sidecar, encoding="utf-8") as f:
                return json.load(f)
        except ValueError:
            pass  # a damaged sidecar: the checkpoint itself holds the same meta
    return load_checkpoint(path)["meta"]


def pick_device(name: str = "auto", strict: bool = True) -> torch.device:
    """auto -> cuda, then mps, then cpu. An unavailable device is an error (strict) or falls back to cpu."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name == "gpu":
        name = "cuda"
    if name not in available:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if not available[name]:
        if strict:
            raise UsageError(f"device {name} is not available on this machine: use --device auto or cpu")
        print(f"warning: {name} is not available on this machine; using cpu instead")
        return torch.device("cpu")
    return torch.device(name)


def check_weights(state_dict: dict, config: ModelConfig, where: str) -> None:
    """Every parameter the model of `config` needs is in state_dict, with its shape, and nothing else."""
    with torch.device("meta"):
        want = Transformer(config).state_dict()  # shapes only: no memory, no init
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or extra or wrong:
        raise UsageError(f"{where}: the weights do not match the model it describes (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, wrong shape {wrong[:3]}): the file is damaged or not ours")


def load_model(path: str, device="cpu", dtype: torch.dtype = torch.float32):
    """Build the model a checkpoint describes and load its weights. Returns (model in eval mode, meta)."""
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    try:
        model_config = ModelConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: its meta does not describe a model ({type(e).__name__}: {e}): "
                         "the file is damaged or not ours") from None
    model_config.gradient_checkpointing = False  # inference never needs it
    check_weights(ckpt["state_dict"], model_config, path)
    # Built on the CPU, not the meta device: random init costs ~0.03 s per million parameters, while
    # nn.init on meta tensors imports torch's compiler stack (~1.5 s), which the first token would wait for.
    model = Transformer(model_config)
    model.load_state_dict(ckpt["state_dict"], assign=True)  # assign: use the file's (mmap'd) tensors
    if model_config.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True replaced the shared tensor: re-tie
    return model.to(device=device, dtype=dtype).eval(), meta
