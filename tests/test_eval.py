"""Evaluation tools: eval_val.py numbers, evaluate_checkpoints.py ranking and files, list.py, loss pictures.

Most checks call the scripts' `main(argv)` in this process (one torch import for the whole file);
a few run them as a user would, in a subprocess, where the exit code or the imports matter.
"""

import csv
import json
import math
import os
import shutil

import pytest
import torch

import eval_val
import evaluate_checkpoints
from checkpoint import read_meta, save_checkpoint
from cli import run_cli
from conftest import run_script
from data import PackedWindows, tokenize_documents
from infer import load_model
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_main(main, argv, capsys):
    """(exit code, stdout, stderr) of `main(argv)` wrapped as on the command line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def last_logged(metrics_csv, column):
    with open(metrics_csv, newline="") as f:
        values = [row[column] for row in csv.DictReader(f) if row[column]]
    return float(values[-1])


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


# ---------------------------------------------------------------------------------------------
# eval_val.py
# ---------------------------------------------------------------------------------------------


def test_bits_per_byte_on_a_hand_computable_case(gpt2):
    # A model whose logits are all zero predicts uniformly: every token costs ln(vocab) nats, the real
    # vocabulary's 50257 (not the 50304 rows the model pads it to).
    model = Transformer(ModelConfig(vocab_size=50257, n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, d_ff=16,
                                    max_seq_len=8, tie_embeddings=False))
    torch.nn.init.zeros_(model.lm_head.weight)
    # "Hello world" EOS "Hi" EOS = [Hello, " world", EOS, Hi, EOS]; one window of 4 scores the last four:
    # " world" (6 bytes) + EOS (1) + "Hi" (2) + EOS (1) = 10 bytes, 4 tokens.
    tokens = tokenize_documents(["Hello world", "Hi"], gpt2)
    result = eval_val.evaluate(model, PackedWindows(tokens, seq_len=4), gpt2, batch_size=1)
    assert (result["tokens"], result["bytes"], result["windows"]) == (4, 10, 1)
    assert result["val_loss"] == pytest.approx(math.log(50257), rel=1e-6)
    assert result["val_ppl"] == pytest.approx(50257, rel=1e-5)
    assert result["val_bpb"] == pytest.approx(4 * math.log2(50257) / 10, rel=1e-6)


def test_bytes_are_counted_on_the_decoded_text_not_token_by_token(gpt2):
    smile = gpt2.encode("🙂")  # one 4-byte character split over two byte-level tokens
    assert len(smile) == 2
    assert eval_val.text_bytes(smile, gpt2) == 4
    assert eval_val.text_bytes(gpt2.encode("naïve café") + [gpt2.eos_id], gpt2) == len("naïve café".encode()) + 1


def test_eval_val_agrees_with_the_training_loop(tiny_ckpt, capsys, monkeypatch):
    """Same held-out windows as training's validation (val_batches batches): the same loss, from the config in the file."""
    parts, val_docs = [], []
    real_load_tokens = eval_val.load_tokens

    def load_tokens(docs, tokenizer, data, part):  # records what eval_val asks to tokenize
        parts.append(part)
        val_docs.extend(docs)
        return real_load_tokens(val_docs, tokenizer, data, part)

    monkeypatch.setattr(eval_val, "load_tokens", load_tokens)
    meta = read_meta(str(tiny_ckpt))
    val_batches = meta["config"]["training"]["val_batches"]
    code, out, _ = run_main(eval_val.main, ["--ckpt", str(tiny_ckpt), "--max-batches", str(val_batches), "--json",
                                            "--device", "cpu"], capsys)
    assert code == 0
    result = json.loads(out)
    assert parts == ["val"] and len(val_docs) == meta["config"]["data"]["val_docs"]  # never the training text
    assert result["val_loss"] == pytest.approx(meta["val_loss"], abs=1e-4)
    assert result["val_loss"] == pytest.approx(last_logged(tiny_ckpt.parent / "metrics.csv", "val_loss"), abs=1e-4)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) * result["tokens"] / result["bytes"])
    assert result["tokens"] == result["windows"] * meta["config"]["training"]["seq_len"]
    assert result["bytes"] > result["tokens"]  # GPT-2 tokens of English average several bytes


def test_eval_val_errors_are_one_line(tmp_path, tiny_ckpt, capsys):
    code, out, err = run_main(eval_val.main, ["--ckpt", str(tmp_path / "missing.ckpt")], capsys)
    assert code == 2 and err.startswith("error: checkpoint not found") and err.count("\n") == 1
    code, _, err = run_main(eval_val.main, ["--ckpt", str(tiny_ckpt), "--split", "test", "--device", "cpu"], capsys)
    assert code == 2 and "--split" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# evaluate_checkpoints.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained_ckpt(tiny_ckpt, tmp_path_factory):
    """A freshly initialised model with the tiny checkpoint's architecture, saved as a step-0 checkpoint."""
    meta = dict(read_meta(str(tiny_ckpt)), step=0, epoch=0.0, tokens_seen=0, train_loss=None, val_loss=None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**meta["model_config"]))
    path = tmp_path_factory.mktemp("untrained") / "step0.ckpt"
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(path))
    return path


# Sentences of data/tiny_corpus.txt ending in its most frequent tokens: what even six training steps learn.
# (Fed as written, as infer.py feeds a prompt; six steps are fragile there: "The tokenizer has a fixed list of
# tokens called" -> " the" ranks ~19000 without an EOS before it, 2 with one.)
FREQUENT_TOKEN_CASES = """
- {name: period_tokens, prompt: "A tokenizer is the tool that turns text into tokens", target: "."}
- {name: period_next, prompt: "A language model is a program that reads text and guesses what comes next", target: "."}
- {name: the_row, prompt: "The length of each row is called", target: " the"}
- {name: period_token, prompt: "The most common pair is joined into one new token", target: "."}
- {prompt: "The model looks at the tokens it has seen so far"}
"""


def test_trained_checkpoint_ranks_above_untrained(tmp_path, tiny_ckpt, untrained_ckpt, capsys):
    json_path, csv_path, cases = tmp_path / "eval.json", tmp_path / "eval.csv", tmp_path / "cases.yaml"
    cases.write_text(FREQUENT_TOKEN_CASES)
    last = tiny_ckpt.parent / "last.ckpt"  # a hard link to final.ckpt: evaluated once, named twice
    code, out, _ = run_main(evaluate_checkpoints.main, [
        "--checkpoints", str(tiny_ckpt), str(untrained_ckpt), str(last), "--cases", str(cases),
        "--device", "cpu", "--top-k", "3", "--json", str(json_path), "--csv", str(csv_path)], capsys)
    assert code == 0
    report = json.loads(json_path.read_text())
    steps = [c["step"] for c in report["checkpoints"]]
    assert steps == sorted(steps) == [0, 6]  # sorted by step; last.ckpt = final.ckpt counted once
    assert report["checkpoints"][1]["aliases"] == [str(last)]
    assert report["ranking"] == [str(tiny_ckpt), str(untrained_ckpt)]
    untrained, trained = report["checkpoints"]
    assert untrained["avg_nll"] == pytest.approx(math.log(50257), abs=0.3)  # ~uniform before training
    # Six tiny steps learn little beyond token frequencies, but that shows: frequent targets move from
    # rank ~thousands (uniform guessing) into the top ten.
    assert trained["avg_nll"] < untrained["avg_nll"] - 0.2
    first_ranks = lambda c: sorted(r["rank_first"] for r in c["case_results"][:4])  # noqa: E731
    assert first_ranks(trained)[-1] <= 10 and first_ranks(untrained)[0] > 100
    assert trained["cases"] == 4 and len(report["cases"]) == 5  # the case without a target is shown, not scored
    assert "ranking by average NLL" in out and "final.ckpt = last.ckpt" in out

    # JSON schema: per checkpoint and per case
    n_cases = len(report["cases"])
    for c in report["checkpoints"]:
        assert set(c) >= {"path", "aliases", "step", "kind", "avg_nll", "ppl", "top1_acc", "exact_match", "cases",
                          "target_tokens", "rank", "case_results"}
        assert c["ppl"] == pytest.approx(math.exp(c["avg_nll"]))
        assert len(c["case_results"]) == n_cases
        for r in c["case_results"][:4]:
            assert set(r) >= {"name", "prompt", "target", "top_k", "greedy", "p_first", "rank_first", "top1_hit",
                              "target_nll", "target_tokens", "greedy_match"}
            assert len(r["top_k"]) == 3 and r["top_k"][0]["prob"] >= r["top_k"][-1]["prob"]
            assert r["top1_hit"] == (r["rank_first"] == 1) and 0 < r["p_first"] <= 1
        total = sum(r["target_nll"] for r in c["case_results"][:4])
        assert c["avg_nll"] == pytest.approx(total / c["target_tokens"])  # token-weighted

    # CSV schema: one row per checkpoint, one per (checkpoint, case)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == evaluate_checkpoints.CHECKPOINT_FIELDS and len(rows) == 2
    assert [r["rank"] for r in rows] == ["2", "1"]
    with open(tmp_path / "eval_cases.csv", newline="") as f:
        case_rows = list(csv.DictReader(f))
    assert list(case_rows[0]) == evaluate_checkpoints.CASE_FIELDS and len(case_rows) == 2 * n_cases


def test_cases_are_scored_over_the_real_vocabulary_only(tiny_ckpt, gpt2):
    """NLL, rank_first, top-k and greedy equal a direct computation over the 50257 tokens, although the
    model's padding rows (50257..50303) are made to win every comparison they would ever take part in."""
    model, _ = load_model(str(tiny_ckpt))
    case = {"name": "c", "prompt": "The capital of France is", "target": " the city", "source": "-"}
    prompt, target = gpt2.encode(case["prompt"]), gpt2.encode(case["target"])
    ids = torch.tensor([prompt + target])
    hidden = []
    model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    with torch.no_grad():
        model(ids)
        h = hidden[-1][0]  # (T, d_model): what the head multiplies
        padding = model.lm_head.weight[gpt2.vocab_size:]  # 47 rows; row i points along position i % T's input
        padding.copy_(100 * (h / h.norm(dim=-1, keepdim=True))[torch.arange(len(padding)) % len(h)])
        every_row = h @ model.lm_head.weight.T  # (T, 50304): what scoring the padding would see
    assert bool((every_row[:, gpt2.vocab_size:].amax(-1) > every_row[:, :gpt2.vocab_size].amax(-1)).all())

    result = evaluate_checkpoints.score_case(model, None, gpt2, case, top_k=5, device="cpu")
    logp = every_row[:, :gpt2.vocab_size].log_softmax(-1)  # the direct computation, real tokens only
    first = logp[len(prompt) - 1]
    nll = -sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(target))
    assert result["target_nll"] == pytest.approx(nll, rel=1e-5)
    assert result["rank_first"] == int((first > first[target[0]]).sum()) + 1
    assert [t["token"] for t in result["top_k"]] == [gpt2.decode([int(i)]) for i in first.topk(5).indices]
    assert [t["prob"] for t in result["top_k"]] == pytest.approx(first.topk(5).values.exp().tolist(), rel=1e-5)
    greedy = list(prompt)
    with torch.no_grad():
        for _ in target:  # no cache: the whole sequence again for every token, argmax over the real rows only
            model(torch.tensor([greedy]))
            greedy.append(int((hidden[-1][0, -1] @ model.lm_head.weight[:gpt2.vocab_size].T).argmax()))
    assert result["greedy"] == gpt2.decode(greedy[len(prompt):])


def test_shipped_case_files_load():
    cases, duplicates = evaluate_checkpoints.load_cases("cases")
    assert len(cases) > 100 and all(c["target"].startswith(" ") for c in cases)
    assert {d["name"] for d in duplicates} >= {"basics_capital_france"}  # also in tiny_corpus.yaml


def test_cases_from_several_files_count_duplicates_once(tmp_path):
    (tmp_path / "a.yaml").write_text('- {name: one, prompt: "The capital of France is", target: " Paris"}\n'
                                     '- {prompt: "Hello"}\n')
    (tmp_path / "b.json").write_text('[{"name": "again", "prompt": "The capital of France is", "target": " Paris"}]')
    cases, duplicates = evaluate_checkpoints.load_cases(f"{tmp_path}")  # a folder: both files
    assert [c["name"] for c in cases] == ["one", "a_2"]
    assert duplicates == [{"name": "again", "source": str(tmp_path / "b.json"), "same_as": "one"}]
    same, _ = evaluate_checkpoints.load_cases(f"{tmp_path}/a.yaml,{tmp_path}/*.json")  # comma list with a glob
    assert len(same) == 2


@pytest.mark.parametrize("text, message", [
    ("prompt: no list", "must be a non-empty list"),
    ("- {target: ' Paris'}", "entry 1 needs a non-empty string 'prompt'"),
    ("- {prompt: 'x', tagret: ' y'}", "unknown key(s) tagret"),
    ("- {prompt: 'x', target: 3}", "'target' must be a non-empty string"),
    ("- {prompt: 'x'\n- [", "syntax error"),
])
def test_malformed_case_files_give_one_line(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, _, err = run_main(evaluate_checkpoints.main, ["--cases", str(bad), "--checkpoints", "nowhere/*.ckpt"], capsys)
    assert code == 2 and err.startswith(f"error: case file {bad}") and message in err and err.count("\n") == 1


def test_missing_checkpoints_exit_2_from_the_command_line(tmp_path):
    result = run_script("evaluate_checkpoints.py", "--checkpoints", str(tmp_path / "*.ckpt"),
                        "--cases", "cases/wiki_basics.yaml", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: no checkpoint matches")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# list.py and pictures
# ---------------------------------------------------------------------------------------------


def test_list_fills_every_column_without_importing_torch(tiny_run, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(tiny_run, folder, copy_function=os.link)  # hard links: same inodes, no copying
    (folder / "sft").mkdir()
    for suffix in ("", ".json"):
        os.link(tiny_run / f"final.ckpt{suffix}", folder / "sft" / f"final.ckpt{suffix}")
    code = ("import json, sys, list as L; L.main(['--dir', sys.argv[1], '--json', '--sort', 'step']); "
            "assert 'torch' not in sys.modules, 'list.py imported torch'")
    rows = json.loads(run_script("-c", code, folder).stdout)
    by_file = {r["file"]: r for r in rows}
    assert {"final.ckpt", "last.ckpt", "best.ckpt", os.path.join("sft", "final.ckpt")} <= set(by_file)
    final = by_file["final.ckpt"]
    assert final["train_loss"] == pytest.approx(last_logged(tiny_run / "metrics.csv", "train_loss"))
    assert final["val_loss"] == pytest.approx(last_logged(tiny_run / "metrics.csv", "val_loss"))
    assert final["step"] == 6 and final["kind"] == "pretrain" and final["n_params"] > 0 and final["tokens_seen"] > 0
    assert final["size"] == os.path.getsize(tiny_run / "final.ckpt") and final["epoch"] is not None
    assert set(final["tags"]) == {"final", "last"} and by_file["best.ckpt"]["tags"] == ["best"]
    periodic = by_file["epoch=0-step=6.ckpt"]
    assert periodic["val_loss"] == final["val_loss"] and "last" not in periodic["tags"]
    assert [r["step"] for r in rows] == sorted((r["step"] for r in rows), reverse=True)


def test_list_reads_checkpoints_without_a_sidecar_and_plots(tiny_ckpt, tmp_path, capsys):
    import importlib

    listing = importlib.import_module("list")
    shutil.copy(tiny_ckpt, tmp_path / "lonely.ckpt")  # no .json sidecar, no metrics.csv: meta from the file
    png = tmp_path / "ckpts.png"
    code, out, _ = run_main(listing.main, ["--dir", str(tmp_path), "--plot", str(png)], capsys)
    assert code == 0 and "lonely.ckpt" in out and "wrote" in out
    header, row = out.splitlines()[:2]
    assert header.split() == ["file", "kind", "step", "epoch", "tokens", "train", "val", "params", "size",
                              "modified", "tags"]
    assert " - " not in row.rsplit(" ", 1)[0]  # every column but tags is filled
    assert png.read_bytes().startswith(PNG_MAGIC)
    code, _, err = run_main(listing.main, ["--dir", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("error: checkpoint folder not found") and err.count("\n") == 1


def test_twenty_checkpoints_list_from_their_sidecars_without_torch(tiny_ckpt, tmp_path):
    """What makes listing fast: every row comes from a sidecar that belongs to its checkpoint, torch never loads."""
    for i in range(20):
        for suffix in ("", ".json"):
            os.link(f"{tiny_ckpt}{suffix}", tmp_path / f"epoch=0-step={i}.ckpt{suffix}")
    code = ("import sys, list as L; L.main(['--dir', sys.argv[1]]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = run_script("-c", code, tmp_path).stdout
    assert len(out.splitlines()) == 22 and out.splitlines()[-1] == "no torch"


def test_training_draws_the_loss_curve(tiny_run, tmp_path):
    png = tiny_run / "loss_curve.png"
    assert png.read_bytes().startswith(PNG_MAGIC)  # written by training.fit at every validation
    from plots import plot_loss_curve, read_losses

    train, val = read_losses(tiny_run / "metrics.csv")
    assert sorted(train) == [2, 4, 6] and sorted(val) == [3, 6]
    assert plot_loss_curve(tiny_run / "metrics.csv", tmp_path / "again.png") == tmp_path / "again.png"


def test_folders_named_with_glob_characters_are_folders(tiny_run, tmp_path, capsys):
    """runs/exp[1] is a folder name, not a pattern: list.py lists it and evaluate_checkpoints.py reads it."""
    import importlib

    listing = importlib.import_module("list")
    folder = tmp_path / "runs" / "exp[1]"
    folder.mkdir(parents=True)
    for suffix in ("", ".json"):
        os.link(tiny_run / f"final.ckpt{suffix}", folder / f"final.ckpt{suffix}")
    (tmp_path / "runs" / "exp1").mkdir()  # what the pattern exp[1] would match instead: empty
    code, out, _ = run_main(listing.main, ["--dir", str(folder), "--json"], capsys)
    assert code == 0 and [r["file"] for r in json.loads(out)] == ["final.ckpt"]
    for spec in (str(folder), str(folder / "final.ckpt")):
        assert [c["path"] for c in evaluate_checkpoints.find_checkpoints([spec])] == [str(folder / "final.ckpt")]
    assert evaluate_checkpoints.find_checkpoints([str(tmp_path / "runs" / "exp[[]1]" / "*.ckpt")])  # a real pattern
