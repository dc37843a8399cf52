"""Faults: kill -9 at arbitrary moments, Ctrl-C, and what is on disk afterwards.

The promise tested here: run the same command again after any interruption and training finishes
with exactly the weights and the loss curve of a run that was never interrupted (fp32, fixed seed),
and no file named *.ckpt is ever truncated. (tests/test_train.py covers an in-process crash, the
non-finite-loss stop and keep_last; this file uses real processes and real signals.)
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
import training
from checkpoint import load_checkpoint, read_meta
from cli import run_cli
from conftest import ROOT, write_config
from tokenizer import load_tokenizer


def start_training(config, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", "--config", str(config), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=120.0, poll=0.001):
    """Poll until condition() is true; fail if the process ends first."""
    end = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before the moment to interrupt it:\n"
                                 + proc.stderr.read()[-3000:])
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to interrupt training")
        time.sleep(poll)


def kill_9(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close(), proc.stderr.close()


def every_ckpt_loads(folder) -> list[str]:
    """Load every *.ckpt (not *.ckpt.tmpPID leftovers): none may be truncated. Returns their names."""
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    for name in names:
        assert "state_dict" in load_checkpoint(str(folder / name)), name
    return names


def final_weights(folder):
    return load_checkpoint(str(folder / "final.ckpt"))["state_dict"]


def train_losses(folder) -> dict:
    with open(folder / "metrics.csv") as f:
        return {int(r["step"]): r["train_loss"] for r in csv.DictReader(f) if r["train_loss"]}


SETTINGS = {"training": {"max_steps": 30, "save_every": 3, "log_every": 1, "val_every": 10, "keep_last": 2}}


def test_kill_9_twice_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    reference = start_training(write_config(straight, SETTINGS))  # runs meanwhile, never interrupted
    config = write_config(killed, SETTINGS)
    ckpts = killed / "checkpoints"

    # Kill 1: as soon as the step-6 checkpoint exists (training has moved on by an unknown amount).
    proc = start_training(config)
    wait_for(lambda: (ckpts / "epoch=0-step=6.ckpt").exists(), proc)
    kill_9(proc)
    every_ckpt_loads(ckpts)
    # Kill 2: the same command resumes; kill it after step 12, the moment a checkpoint is being written
    # (a .tmp exists), or at step 21 if polling never catches one.
    leftovers = set(ckpts.glob("*.tmp*"))  # partial files of kill 1 (they are never read)
    proc = start_training(config)

    def mid_write():
        step = read_meta(str(ckpts / "last.ckpt"))["step"]
        return step >= 12 and set(ckpts.glob("*.tmp*")) - leftovers or step >= 21
    wait_for(mid_write, proc)
    kill_9(proc)
    names = every_ckpt_loads(ckpts)
    assert "final.ckpt" not in names
    # Run 3: the same command again finishes.
    proc = start_training(config)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming from" in out and "done:" in out
    assert reference.wait(timeout=120) == 0
    reference.stdout.close(), reference.stderr.close()

    every_ckpt_loads(ckpts)
    expected = final_weights(straight / "checkpoints")
    for name, tensor in final_weights(ckpts).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)  # bit for bit
    # The loss curve: metrics.csv drops rows a killed run logged past its checkpoint, so every step
    # appears once, with the loss of the uninterrupted run.
    assert train_losses(ckpts) == train_losses(straight / "checkpoints")
    assert sorted(train_losses(ckpts)) == list(range(1, 31))
    periodic = sorted(p.name for p in ckpts.glob("epoch=*.ckpt"))
    assert periodic == ["epoch=0-step=27.ckpt", "epoch=0-step=30.ckpt"]  # keep_last survived the kills


def test_kill_9_during_a_large_checkpoint_write_leaves_only_whole_checkpoints(tmp_path):
    """A ~150 MB checkpoint (big vocabulary embedding + AdamW state) takes long enough to write that the
    kill lands mid-write: the partial file is a .tmp, every .ckpt still loads, and the run resumes."""
    settings = {"model": {"d_model": 256, "n_heads": 4, "n_kv_heads": 2, "d_ff": 256, "n_layers": 1},
                "training": {"max_steps": 3, "save_every": 1, "val_every": 100, "keep_last": 1}}
    config = write_config(tmp_path, settings)
    ckpts = tmp_path / "checkpoints"
    proc = start_training(config)
    wait_for(lambda: (ckpts / "epoch=0-step=1.ckpt").exists() and any(ckpts.glob("*.ckpt.tmp*")), proc)
    kill_9(proc)
    partial = list(ckpts.glob("*.ckpt.tmp*"))
    assert partial, "the kill was meant to land while a checkpoint was being written"
    every_ckpt_loads(ckpts)
    resume_from = training.find_resume_checkpoint(str(ckpts), *model_and_tokenizer(config))
    assert resume_from is not None and resume_from.meta["step"] >= 1  # auto-resume picks a whole checkpoint, never the .tmp
    load_checkpoint(resume_from.path)  # (that the same command then finishes exactly is the test above)


def model_and_tokenizer(config):
    from config import load_config, model_config

    cfg = load_config(str(config))
    tokenizer = load_tokenizer("gpt2")
    return model_config(cfg, tokenizer.vocab_size), tokenizer, "pretrain"  # as train.py sizes the model


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum, code):
    """Ctrl-C, and SIGTERM (kill, a container stop, a cluster scheduler), finish the step, save, and exit."""
    config = write_config(tmp_path, {"training": {"max_steps": 100000, "log_every": 1, "val_every": 1000,
                                                  "save_every": 1000, "grad_accum_steps": 2}})
    proc = start_training(config, "--no_resume")
    wait_for(lambda: (tmp_path / "checkpoints" / "metrics.csv").exists(), proc, poll=0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("interrupted at step"))
    assert line.endswith(f"to resume, run the same command again: python train.py --config {config}")  # no --no_resume
    step = int(line.split()[3].rstrip(":"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert read_meta(str(last))["step"] == step >= 1
    assert read_meta(str(last))["tokens_seen"] == step * 2 * 4 * 32  # counted per finished optimizer step
    # Resume (a shorter max_steps here only to finish quickly).
    assert train.main(["--config", str(config), "--set", f"training.max_steps={step + 2}"]) == 0
    assert read_meta(str(tmp_path / "checkpoints" / "final.ckpt"))["step"] == step + 2


def test_ctrl_c_mid_gradient_accumulation_resumes_exactly(tmp_path, monkeypatch):
    """grad_accum_steps=2: Ctrl-C during the first micro-batch of step 4 finishes that step, saves it, exits 130;
    the resumed run ends bit-identical to an uninterrupted one."""
    settings = {"training": {"max_steps": 8, "val_every": 4, "log_every": 1, "grad_accum_steps": 2}}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    assert train.main(["--config", str(write_config(straight, settings))]) == 0

    config = write_config(stopped, settings)
    interrupt_at_micro_batch = 7  # the first micro-batch of step 4 (1-based)
    calls = []
    original = training.token_loss

    def interrupted_loss(logits, labels):
        calls.append(1)
        if len(calls) == interrupt_at_micro_batch:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process
        return original(logits, labels)

    with monkeypatch.context() as m:
        m.setattr(training, "token_loss", interrupted_loss)
        assert train.main(["--config", str(config)]) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop gave the handler back
    meta = read_meta(str(stopped / "checkpoints" / "last.ckpt"))
    assert meta["step"] == 4 and meta["tokens_seen"] == 4 * 2 * 4 * 32
    assert train.main(["--config", str(config)]) == 0

    expected = final_weights(straight / "checkpoints")
    for name, tensor in final_weights(stopped / "checkpoints").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert train_losses(stopped / "checkpoints") == train_losses(straight / "checkpoints")
    assert read_meta(str(stopped / "checkpoints" / "final.ckpt"))["tokens_seen"] == 8 * 2 * 4 * 32


# ---------------------------------------------------------------------------------------------
# The run folder: glob characters, two runs, a fresh run into an old one, renamed and damaged files
# ---------------------------------------------------------------------------------------------


def test_a_run_folder_with_glob_characters_resumes_and_prunes(tmp_path):
    folder = tmp_path / "runs" / "exp[1]*?"
    config = write_config(tmp_path, {"training": {"checkpoint_dir": str(folder), "max_steps": 6, "save_every": 2,
                                                  "keep_last": 1}})
    assert train.main(["--config", str(config)]) == 0
    assert sorted(p.name for p in folder.glob("epoch=*.ckpt")) == ["epoch=0-step=6.ckpt"]  # keep_last pruned
    resumed = subprocess.run([sys.executable, "train.py", "--config", str(config), "--set", "training.max_steps=8"],
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout and "ckpt at step 6" in resumed.stdout
    assert read_meta(str(folder / "final.ckpt"))["step"] == 8


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    config = write_config(tmp_path, {"training": {"max_steps": 100000, "val_every": 1000, "save_every": 1000}})
    first = start_training(config)
    try:
        wait_for(lambda: (tmp_path / "checkpoints" / "metrics.csv").exists(), first, poll=0.01)
        # The second run, in this process (an fcntl lock refuses a second open of the file even here).
        with pytest.raises(SystemExit) as exit_code:
            run_cli(lambda: train.main(["--config", str(config)]))
        stderr = capsys.readouterr().err
        assert exit_code.value.code == 2 and "Traceback" not in stderr
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "is in use by another run (pid " in lines[0] and str(first.pid) in lines[0]
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
        first.stdout.close(), first.stderr.close()
    # The lock dies with its process: the same command now resumes.
    assert train.main(["--config", str(config), "--set", "training.max_steps=" +
                       str(read_meta(str(tmp_path / "checkpoints" / "last.ckpt"))["step"] + 1)]) == 0


def test_a_fresh_run_moves_the_earlier_run_aside_and_mixes_nothing(tmp_path, capsys):
    settings = {"training": {"max_steps": 6, "save_every": 2, "keep_last": 2}}
    config = write_config(tmp_path, settings)
    assert train.main(["--config", str(config)]) == 0
    old_final = (tmp_path / "checkpoints" / "final.ckpt").read_bytes()
    assert train.main(["--config", str(config), "--no_resume", "--set", "training.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "was moved to" in out
    (aside,) = (tmp_path / "checkpoints").glob("previous-*")
    assert (aside / "final.ckpt").read_bytes() == old_final  # nothing of the earlier run is lost
    assert sorted(p.name for p in aside.glob("epoch=*.ckpt")) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["best.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "final.ckpt", "last.ckpt"]
    with open(tmp_path / "checkpoints" / "metrics.csv") as f:
        assert max(int(r["step"]) for r in csv.DictReader(f)) == 4  # one curve, the new run's
    # The next plain run resumes the NEW run (at step 4), not the old one (step 6).
    assert train.main(["--config", str(config), "--set", "training.max_steps=5"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert read_meta(str(tmp_path / "checkpoints" / "final.ckpt"))["step"] == 5


def test_a_renamed_checkpoint_is_described_by_its_own_meta_not_a_stale_sidecar(tiny_run, tmp_path):
    import shutil

    folder = tmp_path / "checkpoints"
    shutil.copytree(tiny_run, folder)
    assert read_meta(str(folder / "last.ckpt"))["step"] == 6
    os.replace(folder / "epoch=0-step=4.ckpt", folder / "last.ckpt")  # what `mv` does; last.ckpt.json stays
    assert read_meta(str(folder / "last.ckpt"))["step"] == 4


def test_corrupted_tensor_bytes_are_refused(tiny_ckpt, tmp_path):
    import zipfile

    from cli import UsageError

    damaged = tmp_path / "damaged.ckpt"
    data = bytearray(tiny_ckpt.read_bytes())
    with zipfile.ZipFile(tiny_ckpt) as archive:  # the largest tensor: the embedding
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    with open(tiny_ckpt, "rb") as f:  # where its bytes start: after the entry's local header
        f.seek(entry.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = entry.header_offset + 30 + name_len + extra_len
    data[start + 100] ^= 0xFF  # one flipped byte in the middle of a weight
    damaged.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="damaged.ckpt is corrupted .*fail their checksum"):
        load_checkpoint(str(damaged))
    result = subprocess.run([sys.executable, "infer.py", "--ckpt", str(damaged), "--prompt", "Hi"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is corrupted" in result.stderr


def test_disk_full_while_saving_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    import errno

    import checkpoint
    import cli

    settings = {"training": {"max_steps": 6, "save_every": 2}}
    cfg_path = write_config(tmp_path, settings)
    original = checkpoint.atomic_write
    calls = []

    def full_disk(path, write):
        calls.append(path)
        if path.endswith("step=4.ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp1")
        return original(path, write)
    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: train.main(["--config", str(cfg_path)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 3 and len(err[-1:]) == 1
    assert err[-1].startswith("error: no space left on device while writing ") and "intact" in err[-1]
    # The newest whole save (best.ckpt after step 3's validation) is what last.ckpt still points at.
    assert read_meta(str(tmp_path / "checkpoints" / "last.ckpt"))["step"] == 3
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_ctrl_c_during_generation_is_one_line_and_exit_130(tiny_ckpt):
    proc = subprocess.Popen([sys.executable, "infer.py", "--ckpt", str(tiny_ckpt), "--prompt", "Hi",
                             "--max-new-tokens", "100000", "--disable-eos", "--seed", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(4)  # generation has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("sidecar", ["[1, 2]", '{"meta": [1, 2], "fingerprint": "x"}', "{not json", '"a string"', ""])
def test_a_damaged_or_foreign_sidecar_is_never_trusted(tiny_ckpt, tmp_path, sidecar):
    """Whatever lies in NAME.ckpt.json, the checkpoint's own meta is what every reader reports."""
    import shutil

    copy = tmp_path / "final.ckpt"
    shutil.copyfile(tiny_ckpt, copy)
    (tmp_path / "final.ckpt.json").write_text(sidecar)
    assert read_meta(str(copy))["step"] == 6
    if sidecar != "[1, 2]":
        return  # the scripts below read meta through read_meta: one case shows it from the outside
    info = subprocess.run([sys.executable, "infer.py", "--ckpt", str(copy), "--info-only"], cwd=ROOT,
                          capture_output=True, text=True)
    assert info.returncode == 0 and "step" in info.stdout and "6" in info.stdout
    listing = subprocess.run([sys.executable, "list.py", "--dir", str(tmp_path), "--json"], cwd=ROOT,
                             capture_output=True, text=True)
    assert listing.returncode == 0 and json.loads(listing.stdout)[0]["step"] == 6
