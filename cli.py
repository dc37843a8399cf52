"""The command-line contract every script shares: one line per mistake, an exit code per kind of failure.

    from cli import UsageError, run_cli
    def main(argv=None):
        raise UsageError("--steps must be positive, got -1")   # printed as `error: ...`, exit 2
    if __name__ == "__main__":
        run_cli(main)

`run_cli` is what a learner reads first: it turns each failure the user can act on into one line on stderr
and an exit code (docs/TROUBLESHOOTING.md lists them). The rest are the checks every script runs on its
input before any work starts: output files, float flags, UTF-8 text files, and the device to run on.

This module imports no torch (pick_device imports it when called), so light scripts (list.py,
train_tokenizer.py) start in a fraction of a second.
"""

import errno
import math
import os
import signal
import sys


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a container stop, a scheduler), raised like Ctrl-C's KeyboardInterrupt so that the same
    clean-up runs. (The training loop catches both signals itself to save a checkpoint first.)"""


EXIT_USAGE, EXIT_SYSTEM = 2, 3  # docs/TROUBLESHOOTING.md lists every exit code
SYSTEM_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def run_cli(main):
    """Run `main()` as a command, every failure the user can act on as ONE line on stderr:

    UsageError                               error: ...                     exit 2
    disk full, read-only, no permission      error: ... while writing FILE  exit 3
    out of memory                            error: out of memory ...       exit 3
    Ctrl-C / SIGTERM (outside training)      interrupted                    exit 130 / 143
    """
    def terminate(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt as e:
        print("\ninterrupted" + (" (SIGTERM)" if isinstance(e, Terminated) else ""), file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except OSError as e:
        if e.errno not in SYSTEM_ERRORS:
            raise
        print(f"error: {SYSTEM_ERRORS[e.errno]} while writing {e.filename or 'a file'}: free some space or pick "
              "a writable folder; files written before (earlier checkpoints) are intact", file=sys.stderr)
        sys.exit(EXIT_SYSTEM)
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # torch's, on a GPU
                or "can't allocate memory" in str(e)):  # torch's CPU allocator
            raise
        print("error: out of memory: lower training.micro_batch_size (raise grad_accum_steps to keep the batch), "
              "seq_len or the model size", file=sys.stderr)
        sys.exit(EXIT_SYSTEM)


def check_output_file(path: str, flag: str) -> None:
    """An output file a script will write at the end: its folder must exist now, and it must not be a folder,
    so that a mistake costs nothing (checked before any work starts)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist: create it first")


def reject_non_finite(args) -> None:
    """Refuse nan/inf in any float command-line flag (argparse's float() accepts them): one line, exit 2."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


# ---------------------------------------------------------------------------------------------
# Text files: the one reader of UTF-8 text (configs, data, tokenizer files, train_tokenizer.py's input)
# ---------------------------------------------------------------------------------------------


def read_text(path: str) -> str:
    """The text of a UTF-8 file. Not UTF-8, or binary (a NUL byte), is a one-line UsageError naming the line."""
    with open_file(path) as f:
        return decode_text(f.read(), path)


def open_file(path: str):
    """open(path, "rb"), or a one-line UsageError (permissions, a broken link, a folder where a file was expected)."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror or type(e).__name__}): check the file and its "
                         "permissions") from None


def decode_text(raw: bytes, path: str, first_line: int = 1) -> str:
    """raw bytes of `path` (starting at line `first_line`) as text, or a UsageError that names the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}): save it as UTF-8 (a parquet or "
                         "csv file needs its own extension)") from None
    if "\x00" in text:
        line = first_line + raw.count(b"\n", 0, raw.index(b"\x00"))
        raise UsageError(f"{path}:{line}: binary data (a NUL byte), not text: name a text file (a parquet or csv "
                         "file needs its own extension)")
    return text[1:] if first_line == 1 and text.startswith("\ufeff") else text  # drop a byte-order mark


def first_line_of(error: Exception) -> str:
    """The first line of an error a library raised, for a one-line message that quotes it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


# ---------------------------------------------------------------------------------------------
# Devices: --device and hardware.accelerator
# ---------------------------------------------------------------------------------------------


def pick_device(name: str = "auto", strict: bool = True):
    """auto -> cuda, then mps, then cpu. An unavailable device is an error (strict) or falls back to cpu."""
    import torch

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
