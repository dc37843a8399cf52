"""The docs cannot rot: the config reference equals the code, the README map equals the tree, and the
command blocks a reader is told to run do run.

- docs/CONFIG_REFERENCE.md lists exactly the keys of config.py's dataclasses and model.ModelConfig,
  with their types and defaults, and every key it lists is read somewhere outside config.py.
- Attribute reads of config keys in the scripts (`cfg.training.lr`, `t.lr` in train.py, ...) name
  keys that exist (so a key the code reads cannot be missing from the reference).
- README.md's project map names only files that exist, and every top-level .py/.yaml file.
- docs/LEARNING_PATH.md's "Read" lines name functions and classes that exist.
- Every ```bash block of README.md and docs/LEARNING_PATH.md preceded by `<!-- offline -->` runs,
  in order, in one scratch copy of the repository (so ./checkpoints is never touched). The copy's
  two smoke configs are shortened to a few steps: the blocks run exactly as written, in seconds.

    python -m pytest -q tests/test_docs.py
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

import config
from model import ModelConfig

SECTIONS = {"model": ModelConfig, "training": config.Training, "hardware": config.Hardware,
            "data": config.Data, "finetune": config.Finetune}
# Model keys whose default, when a config leaves them out, is not ModelConfig's own (config.model_config):
# the tokenizer's vocabulary and training.seq_len.
DERIVED_DEFAULTS = {"model.vocab_size": None, "model.max_seq_len": None}
RUNNABLE = "<!-- offline -->"


# ---------------------------------------------------------------------------------------------
# docs/CONFIG_REFERENCE.md
# ---------------------------------------------------------------------------------------------


def type_name(hint) -> str:
    """How the reference writes a type: int, float or null, int or str, list."""
    if typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    return "list" if hint is list or typing.get_origin(hint) is list else hint.__name__


def code_keys() -> dict:
    """'section.key' -> (type name, default) for every key a config file may set."""
    keys = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            keys[prefix + f.name] = (type_name(hints[f.name]), DERIVED_DEFAULTS.get(prefix + f.name, default))

    for section, cls in SECTIONS.items():
        walk(cls, f"{section}.")
    return keys


def reference_rows() -> dict:
    """'section.key' -> {type, default, meaning, read_by} from the tables of docs/CONFIG_REFERENCE.md."""
    rows, section = {}, None
    for line in (ROOT / "docs" / "CONFIG_REFERENCE.md").read_text().splitlines():
        heading = re.match(r"## `(\w+)`", line)
        if heading:
            section = heading.group(1)
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if section and cells:
            key = f"{section}.{cells[0].strip('`')}"
            assert key not in rows, f"{key} is listed twice"
            rows[key] = {"type": cells[1], "default": cells[2].strip("`"), "meaning": cells[3], "read_by": cells[4]}
    return rows


def test_config_reference_lists_every_key_with_its_type_and_default():
    code, doc = code_keys(), reference_rows()
    assert sorted(set(code) - set(doc)) == [], "keys in the code but not in docs/CONFIG_REFERENCE.md"
    assert sorted(set(doc) - set(code)) == [], "keys in docs/CONFIG_REFERENCE.md that the code does not define"
    for key, (type_, default) in code.items():
        row = doc[key]
        assert row["type"] == type_, f"{key}: the reference says {row['type']}, the code {type_}"
        written = yaml.safe_load(row["default"])
        if isinstance(default, float) and isinstance(written, str):
            written = float(written)  # YAML reads 1e-05 as a string
        assert written == default, f"{key}: the reference says default {row['default']}, the code {default!r}"
        assert row["meaning"], f"{key} has no meaning"
        for script in re.findall(r"[\w/]+\.py", row["read_by"]):
            assert (ROOT / script).is_file(), f"{key}: 'read by' names {script}, which does not exist"


def python_sources(exclude=("config.py",)) -> str:
    files = list(ROOT.glob("*.py")) + list(ROOT.glob("benchmarks/*.py"))
    return "\n".join(p.read_text() for p in files if p.name not in exclude)


def test_every_documented_key_is_read_outside_config_py():
    source = python_sources()
    for key in reference_rows():
        name = key.rsplit(".", 1)[1]
        assert re.search(rf"\.{name}\b|[\"']{name}[\"']", source), f"nothing outside config.py reads {key}"


def test_config_keys_read_by_the_scripts_exist():
    """`cfg.training.x`, `t.x` (t = cfg.training in train.py/finetune.py), `hw.x`, `data.x` in data.py."""
    known = set(code_keys()) | {"model.given"}  # config.Model.given(): a method, not a key
    reads = []
    for path in list(ROOT.glob("*.py")) + list(ROOT.glob("benchmarks/*.py")):
        text = path.read_text()
        reads += re.findall(r"\bcfg\.((?:model|training|hardware|data|finetune)\.\w+(?:\.\w+)?)", text)
        if path.name in ("train.py", "training.py", "finetune.py", "eval_val.py"):
            reads += ["training." + k for k in re.findall(r"(?<![\w.])(?:self\.)?t\.(\w+(?:\.\w+)?)", text)]
            reads += ["hardware." + k for k in re.findall(r"(?<![\w.])hw\.(\w+)", text)]
        if path.name == "data.py":
            functions = set(re.findall(r"^def (\w+)", text, re.M))
            reads += ["data." + k for k in re.findall(r"(?<![\w.])data\.(\w+)", text) if k not in functions]
    for key in reads:
        # `t.early_stopping` alone is the sub-section; its keys are checked where they are read
        section_keys = {k.rsplit(".", 1)[0] for k in known}
        assert key in known or key in section_keys, f"the code reads config key {key}, which config.py does not define"


# ---------------------------------------------------------------------------------------------
# README.md project map and LEARNING_PATH.md references
# ---------------------------------------------------------------------------------------------


def test_readme_project_map_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Project map\s+```\n(.*?)```", readme, re.S).group(1)
    named = re.findall(r"[├└]── ([\w./-]+)", block)
    assert named, "no entries found in the README project map"
    for name in named:
        assert (ROOT / name).exists(), f"the README project map names {name}, which does not exist"
    top_level = {p.name for p in ROOT.iterdir() if p.is_file() and p.suffix in (".py", ".yaml")}
    assert sorted(top_level - set(named)) == [], "top-level files missing from the README project map"


def test_learning_path_names_code_that_exists():
    text = (ROOT / "docs" / "LEARNING_PATH.md").read_text()
    reads = re.findall(r"^Read `([\w/]+\.py)`: (.+)$", text, re.M)
    assert len(reads) >= 6
    for script, names in reads:
        source = (ROOT / script).read_text()
        for name in re.findall(r"`([\w.]+)`", names):
            for part in name.split("."):
                assert re.search(rf"^\s*(def|class) {part}\b", source, re.M), f"{script} has no {name}"


# ---------------------------------------------------------------------------------------------
# Runnable blocks
# ---------------------------------------------------------------------------------------------


def runnable_blocks(doc: Path) -> list[str]:
    """The ```bash blocks that directly follow a `<!-- offline -->` line."""
    pattern = re.escape(RUNNABLE) + r"\s*\n```bash\n(.*?)```"
    return re.findall(pattern, doc.read_text(), re.S)


def scratch_copy(folder: Path) -> Path:
    """What a reader has after cloning: scripts, configs, data, cases, benchmarks; smoke configs shortened."""
    for path in ROOT.iterdir():
        if path.is_file() and path.suffix in (".py", ".yaml", ".txt"):
            shutil.copy(path, folder)
    for name in ("data", "cases", "benchmarks"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name, steps in (("config_smoke.yaml", 6), ("config_finetune_smoke.yaml", 4)):
        raw = yaml.safe_load((folder / name).read_text())
        raw["training"].update(max_steps=steps, val_every=steps, save_every=steps, log_every=2)
        (folder / name).write_text(yaml.safe_dump(raw))
    return folder


def test_runnable_blocks_exist():
    assert len(runnable_blocks(ROOT / "README.md")) >= 2
    assert len(runnable_blocks(ROOT / "docs" / "LEARNING_PATH.md")) >= 5


def test_runnable_blocks_of_readme_and_learning_path_run(tmp_path):
    work = scratch_copy(tmp_path)
    # One thread per process: the suite may share the cores with other jobs, and then every small parallel
    # op waits for a descheduled thread (evaluate_checkpoints.py took 41 s instead of 3 s that way).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    for doc in (ROOT / "README.md", ROOT / "docs" / "LEARNING_PATH.md"):
        for block in runnable_blocks(doc):
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, (f"{doc.name} block failed (exit {result.returncode}):\n{block}\n"
                                            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
