"""Every script explains itself: `--help` exits 0, shows the docstring's example commands, and knows
every flag those examples use.

    python -m pytest -q tests/test_cli_help.py

The scripts are started all at once (most of the time is importing torch), so the file takes about as
long as the slowest `--help` (train.py's, which imports Lightning).
"""

import importlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["train.py", "finetune.py", "infer.py", "evaluate_checkpoints.py", "eval_val.py", "list.py",
           "convert.py", "train_tokenizer.py", "plots.py", "explore.py", "check_replies.py", "benchmarks/bench_model.py",
           "benchmarks/bench_infer.py", "benchmarks/shakespeare.py", "benchmarks/bench_explore.py", "benchmarks/bench_decode.py"]
SUBCOMMANDS = {"convert.py": ["to-hf", "to-gguf", "from-hf", "from-gguf", "to-peft", "from-peft"]}


def docstring(script: str) -> str:
    text = (ROOT / script).read_text()
    return re.match(r'\s*"""(.*?)"""', text, re.S).group(1)


def example_lines(script: str) -> list[str]:
    """Docstring lines that run this script: `python SCRIPT ...`, comments cut off."""
    name = re.escape(script)
    return [line.split("  #")[0].strip() for line in docstring(script).splitlines()
            if re.search(rf"python (\S*/)?{name}\b", line) or re.search(rf"python {re.escape(script.split('/')[-1])}\b", line)]


@pytest.fixture(scope="module")
def help_texts() -> dict:
    """script -> its --help output (subcommands' help appended), every process started at once."""
    runs = {}
    for script in SCRIPTS:
        for sub in [[]] + [[s] for s in SUBCOMMANDS.get(script, [])]:
            runs[(script, *sub)] = subprocess.Popen([sys.executable, script, *sub, "--help"], cwd=ROOT,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    texts = {}
    for (script, *sub), proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{script} {' '.join(sub)} --help exited {proc.returncode}: {err[-2000:]}"
        texts[script] = texts.get(script, "") + out
    return texts


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_docstring_examples_and_their_flags(script, help_texts):
    examples = example_lines(script)
    assert examples, f"{script}'s docstring has no runnable example command (`python {script} ...`)"
    text = help_texts[script]
    assert "usage:" in text
    assert examples[0].split(" #")[0] in text, f"{script} --help does not show its docstring examples"
    for line in examples:
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line):
            assert flag in text, f"{script}: the example `{line}` uses {flag}, which --help does not list"


def test_every_script_has_a_help_entry():
    on_disk = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]}
    libraries = {"model.py", "cli.py", "tokenizer.py", "chat.py", "sources.py", "data.py", "config.py", "schema.py",
                 "checkpoint.py", "training.py", "lora.py", "gguf_format.py"}  # imported, never run
    assert sorted(on_disk - libraries - set(SCRIPTS)) == [], "a runnable script is missing from SCRIPTS"


@pytest.mark.parametrize("script", ["infer.py", "explore.py"])
def test_the_defaults_help_shows_are_the_values_the_script_uses(script, help_texts):
    """Each `(default: X)` that --help prints is what parse_args gives when the flag is left out."""
    module = importlib.import_module(script.removesuffix(".py"))
    defaults = vars(module.parse_args([]))
    options = help_texts[script].split("\noptions:\n", 1)[1]
    shown = 0
    for entry in re.split(r"\n(?=  -)", options):
        text = " ".join(entry.split())
        default = re.search(r"\(default: ([^()]*)\)$", text)
        dest = re.match(r"(?:-\w, )?--([\w-]+)", text).group(1).replace("-", "_")
        if default and dest in defaults:
            assert default.group(1) == str(defaults[dest]), (
                f"{script} --help says --{dest} defaults to {default.group(1)}, but it is {defaults[dest]!r}")
            shown += 1
    assert shown >= 5


def test_infer_help_says_the_instruction_template_is_automatic(help_texts):
    """--instruct and --no-wrap set one value; left out, it follows the checkpoint's kind (None), which
    argparse would print as `--no-wrap (default: True)`."""
    import infer

    assert infer.parse_args([]).instruct is None
    text = " ".join(help_texts["infer.py"].split())
    flags = text[text.index("--instruct wrap"):text.index("--interactive REPL")]
    assert "automatic, on for fine-tuned (SFT) checkpoints" in flags
    assert not re.search(r"\(default: (True|False|None)\)", flags), flags
