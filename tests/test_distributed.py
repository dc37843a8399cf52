"""Real DDP on CPU: two processes (hardware.accelerator cpu, devices 2, strategy ddp) through Lightning.

One run of 4 steps, then the same folder resumed to 8 steps, compared with a single process
that trains the same global batch (micro_batch_size doubled): the ranks see disjoint halves of
exactly the single process's batches, the losses and weights agree, checkpoints are written once.
Batches are recorded by a wrapper around training.loader: in this process for the single-process
reference, in a small script for DDP (Lightning starts rank 1 by re-running the command, so there the
recording must live in the script it runs).
"""

import csv
import json

import yaml

import finetune
import train
import training
from checkpoint import load_checkpoint, read_meta
from conftest import ROOT, run_script, write_config


def recording(loader, log_path):
    """training.loader, also appending (rank, step, first tokens of each row) of every training batch to log_path."""
    def recording_loader(samples, t, fabric, start, stop, shuffle, collate_fn=None, workers=0):
        batches = loader(samples, t, fabric, start, stop, shuffle, collate_fn, workers)
        if not shuffle:  # validation
            return batches
        first_step = start // (t.micro_batch_size * t.grad_accum_steps * fabric.world_size)

        def record():
            for i, (x, y) in enumerate(batches):
                with open(log_path, "a") as f:
                    rows = [row[:8].tolist() for row in x]
                    f.write(json.dumps({"rank": fabric.global_rank, "step": first_step + i // t.grad_accum_steps,
                                        "rows": rows}) + "\n")
                yield x, y
        return record()
    return recording_loader


# Lightning starts rank 1 by re-running the command, so a DDP run records through a script of its own.
RECORDER = f'''
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import cli, finetune, train, training
from test_distributed import recording

training.loader = recording(training.loader, sys.argv[-1])
script = {{"train.py": train, "finetune.py": finetune}}[sys.argv[1]]
cli.run_cli(lambda: script.main(sys.argv[2:-1]))
'''


def record(tmp_path, script, *args):
    """Run `python SCRIPT ARGS` through the recorder, in two processes."""
    (tmp_path / "record.py").write_text(RECORDER)
    return run_script(tmp_path / "record.py", script, *args, tmp_path / "batches.jsonl")


def read_batches(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def metrics(folder, column) -> dict:
    with open(folder / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r[column]}


def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    settings = {"training": {"max_steps": 4, "save_every": 2, "val_every": 2, "log_every": 1, "keep_last": 0}}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()

    # One process, micro_batch_size 8: the global batch is 8 sequences.
    single_config = write_config(single, {**settings, "training": {**settings["training"], "micro_batch_size": 8}})
    monkeypatch.setattr(training, "loader", recording(training.loader, single / "batches.jsonl"))
    assert train.main(["--config", str(single_config)]) == 0  # in this process: one process is what it checks
    assert train.main(["--config", str(single_config), "--set", "training.max_steps=8"]) == 0  # resume 4 -> 8

    # Two processes, micro_batch_size 4 each: 4 x 2 ranks = the same 8 sequences per step.
    ddp_config = write_config(ddp, {**settings, "hardware": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}})
    first = record(ddp, "train.py", "--config", ddp_config)
    assert "device: cpu x 2" in first.stdout and "32 tokens x 1 accum x 2 devices" in first.stdout
    assert first.stdout.count("done:") == 1  # rank 0 reports, once
    resumed = record(ddp, "train.py", "--config", ddp_config, "--set", "training.max_steps=8")
    assert "resuming from" in resumed.stdout

    # The two ranks split every step's global batch into disjoint halves of the single process's batch.
    single_batches, ddp_batches = read_batches(single / "batches.jsonl"), read_batches(ddp / "batches.jsonl")
    for step in range(8):
        rank0 = [r for b in ddp_batches if b["step"] == step and b["rank"] == 0 for r in b["rows"]]
        rank1 = [r for b in ddp_batches if b["step"] == step and b["rank"] == 1 for r in b["rows"]]
        expected = [r for b in single_batches if b["step"] == step for r in b["rows"]]
        assert len(rank0) == len(rank1) == 4
        assert sorted(rank0 + rank1) == sorted(expected), f"step {step}"
        assert rank0 == expected[0::2] and rank1 == expected[1::2]  # strided: rank r takes samples r, r+2, ...

    # Losses (train: averaged over both ranks; val: token-weighted over both ranks) and weights agree.
    for column in ("train_loss", "val_loss"):
        ours, reference = metrics(ddp / "checkpoints", column), metrics(single / "checkpoints", column)
        assert ours.keys() == reference.keys() and ours
        for step in ours:
            assert abs(ours[step] - reference[step]) < 2e-4, (column, step, ours[step], reference[step])
    final = load_checkpoint(str(ddp / "checkpoints" / "final.ckpt"))
    expected = load_checkpoint(str(single / "checkpoints" / "final.ckpt"))["state_dict"]
    for name, tensor in final["state_dict"].items():
        assert (tensor - expected[name]).abs().max() < 1e-4, (name, (tensor - expected[name]).abs().max())
    assert final["meta"]["tokens_seen"] == read_meta(str(single / "checkpoints" / "final.ckpt"))["tokens_seen"]

    # Checkpoints written once, by rank 0: the expected names, no leftovers, every one loads.
    files = sorted(p.name for p in (ddp / "checkpoints").iterdir() if p.suffix == ".ckpt")
    periodic = [name for name in files if name.startswith("epoch=")]
    assert [int(name.split("step=")[1].split(".")[0]) for name in periodic] == [2, 4, 6, 8], files  # once each
    assert sorted(set(files) - set(periodic)) == ["best.ckpt", "final.ckpt", "last.ckpt"]
    assert not list((ddp / "checkpoints").glob("*.tmp*"))
    for name in files:
        assert load_checkpoint(str(ddp / "checkpoints" / name))["meta"]["kind"] == "pretrain"


def test_ddp_finetuning_splits_batches_writes_once_and_resumes(tmp_path, tiny_ckpt):
    """finetune.py on two CPU processes: disjoint examples per rank, one set of checkpoints, resume works.

    Validation sums over both ranks, so its loss is the single process's; training losses are compared
    loosely: each rank averages over its own supervised tokens (examples differ in length), so the DDP
    gradient is a mean of two means rather than one mean over all response tokens.
    """
    from test_finetune import sft_config

    steps = {"max_steps": 4, "save_every": 2, "val_every": 2, "log_every": 1, "keep_last": 0}
    (tmp_path / "ddp").mkdir()
    ddp_config = sft_config(tmp_path / "ddp", tiny_ckpt, **steps)
    with open(ddp_config) as f:
        config = yaml.safe_load(f)
    config["hardware"] = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
    ddp_config.write_text(yaml.safe_dump(config))
    first = record(tmp_path, "finetune.py", "--config", ddp_config, "--set", "training.max_steps=2")
    assert "x 2 devices" in first.stdout and first.stdout.count("done:") == 1
    resumed = record(tmp_path, "finetune.py", "--config", ddp_config)
    assert "resuming from" in resumed.stdout

    batches = read_batches(tmp_path / "batches.jsonl")
    for step in range(4):
        rank0 = [r for b in batches if b["step"] == step and b["rank"] == 0 for r in b["rows"]]
        rank1 = [r for b in batches if b["step"] == step and b["rank"] == 1 for r in b["rows"]]
        assert len(rank0) == len(rank1) == 4 and not any(r in rank1 for r in rank0), f"step {step}"

    single = tmp_path / "single"
    single.mkdir()
    single_config = sft_config(single, tiny_ckpt, **{**steps, "micro_batch_size": 8})
    assert finetune.main(["--config", str(single_config)]) == 0
    ours, reference = metrics(tmp_path / "ddp" / "sft", "val_loss"), metrics(single / "sft", "val_loss")
    assert ours.keys() == reference.keys() == {2, 4}
    for step in ours:
        assert abs(ours[step] - reference[step]) < 0.01 * reference[step], (step, ours[step], reference[step])

    files = sorted(p.name for p in (tmp_path / "ddp" / "sft").iterdir() if p.suffix == ".ckpt")
    assert [n for n in files if n.startswith("epoch=")] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"], files
    assert not list((tmp_path / "ddp" / "sft").glob("*.tmp*"))
    assert load_checkpoint(str(tmp_path / "ddp" / "sft" / "final.ckpt"))["meta"]["kind"] == "sft"
