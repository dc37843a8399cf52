"""Loading a checkpoint never runs code from it.

A .ckpt is a pickle, and unpickling can call any Python function the file names. checkpoint.py
loads with torch.load(weights_only=True), which only rebuilds tensors and plain data, and every
script loads checkpoints through checkpoint.py.
"""

import os
import re

import pytest
import torch

from checkpoint import load_checkpoint, read_meta
from cli import UsageError
from conftest import ROOT, run_script
from infer import load_model


class Payload:
    """Pickles as "call os.system(command)": what a malicious checkpoint would contain."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.embed.weight": torch.zeros(2, 2)}, "meta": {"step": 1},
                "surprise": Payload(f"touch {marker}")}, path)
    return path, marker


def test_the_payload_would_run_if_loaded_unsafely(crafted):
    """Proves the test file is really dangerous: a plain (unsafe) load runs the command."""
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crafted_pickle_is_refused_and_runs_nothing(crafted):
    path, marker = crafted
    with pytest.raises(UsageError, match=r"holds Python objects beyond tensors and plain data; refusing to load it"):
        load_checkpoint(str(path))
    with pytest.raises(UsageError, match="refusing to load it"):
        load_model(str(path))
    with pytest.raises(UsageError, match="refusing to load it"):
        read_meta(str(path))  # no sidecar: falls back to the (safe) load
    assert not marker.exists()


def test_a_script_refuses_it_with_one_line(crafted):
    path, marker = crafted
    result = run_script("infer.py", "--ckpt", path, "--prompt", "Hi", check=False)
    assert result.returncode == 2 and "refusing to load it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Checkpoints are read through checkpoint.load_checkpoint; the one other reader (convert.py, for a
    Hugging Face pytorch_model.bin) is weights-only too. No plain pickle loads anywhere."""
    offenders = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("benchmarks/*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            unsafe_torch = re.search(r"torch\.load\(|torch\.serialization\.load\(", line) and "weights_only=True" not in line
            if unsafe_torch or re.search(r"pickle\.loads?\(|Unpickler\(", line):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not offenders, offenders
    assert "weights_only=True" in (ROOT / "checkpoint.py").read_text()
