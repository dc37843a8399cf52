"""finetune.py: what SFT trains on (masking, truncation, template), where its weights come from and go,
that it works (response loss drops, resume), and that bad input fails in one clear line.

The base model is the tiny_ckpt fixture (a 6-step tiny pretraining run shared by the session).
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import chat
import finetune
import training
from checkpoint import read_meta
from cli import UsageError
from conftest import ROOT, TINY_CONFIG, run_script
from infer import load_model
from tokenizer import load_tokenizer

TOK = load_tokenizer("gpt2")
ALPACA = chat.Chat(chat.instruction_chat_template(), TOK)  # what SFT of our own models trains on
format_instruction = chat.format_instruction


def encode_example(instruction, input_text, output, max_tokens):
    """finetune.encode_example of an instruction record, as (ids, n_prompt, truncated): one reply, after the prompt."""
    record = {"instruction": instruction, "input": input_text, "output": output}
    encoded = finetune.encode_example(ALPACA, record, max_tokens)
    if encoded is None:
        return None
    ids, trained, truncated = encoded
    n_prompt = trained.index(True)
    assert all(trained[n_prompt:])  # one supervised stretch: the reply, to the end
    return ids, n_prompt, truncated


def sft_config(folder, base, **settings):
    """A tiny SFT config: TINY_CONFIG's training keys, no model dims, data/tiny_instructions.jsonl."""
    config = {
        "finetune": {"base_checkpoint": str(base)},
        "training": {**TINY_CONFIG["training"], "checkpoint_dir": str(folder / "sft"), **settings},
        "data": {"dataset": str(ROOT / "data" / "tiny_instructions.jsonl"), "val_docs": 20},
    }
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------------------------
# What is trained on
# ---------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_response_and_eos_shifted_by_one():
    ids, n_prompt, truncated = encode_example("Add the numbers.", "2 and 3", "2 plus 3 is 5.", 100)
    prompt = TOK.encode(format_instruction("Add the numbers.", "2 and 3"))
    assert ids[:n_prompt] == prompt and n_prompt == len(prompt) and not truncated
    assert ids[n_prompt:] == TOK.encode("2 plus 3 is 5.") + [TOK.eos_id]

    x, y = finetune.make_sample(ids, [k >= n_prompt for k in range(len(ids))])
    assert x.tolist() == ids[:-1]
    supervised = (y != -100).nonzero().flatten().tolist()
    assert supervised == list(range(n_prompt - 1, len(ids) - 1))  # from the last prompt token on
    assert y[n_prompt - 1] == ids[n_prompt]  # "\n" after "### Response:" predicts the first response token
    assert TOK.decode(y[y != -100].tolist()) == "2 plus 3 is 5.<|endoftext|>"


def test_prompt_is_encoded_as_inference_encodes_it():
    # The prompt's ids are what infer.py feeds the model; the response is encoded on its own (stripped).
    ids, n_prompt, _ = encode_example("Say hi.", "", "   hi", 100)
    assert ids == TOK.encode(format_instruction("Say hi.")) + TOK.encode("hi") + [TOK.eos_id]
    # With GPT-2 this equals encoding the whole text at once, so the boundary holds no surprise tokens.
    for record in map(json.loads, open(ROOT / "data" / "tiny_instructions.jsonl")):
        ids, n_prompt, _ = encode_example(record["instruction"], record.get("input", ""), record["output"], 1000)
        prompt = format_instruction(record["instruction"], record.get("input", ""))
        assert ids == TOK.encode(prompt + record["output"].strip()) + [TOK.eos_id]


def test_one_template_shared_with_inference():
    assert finetune.chat_for_base({"kind": "pretrain"}, TOK).template == chat.instruction_chat_template()
    for script in ("finetune.py", "infer.py", "explore.py", "tokenizer.py", "convert.py"):
        code = (ROOT / script).read_text().split('"""', 2)[2]  # all but the module docstring
        assert "### Instruction" not in code and "def format_instruction" not in code  # no second copy


def test_truncation_trims_input_first_then_response_never_the_header():
    instruction, long_input, output = "Summarize the text.", " ".join(["word"] * 60), "A short summary of it."
    header = TOK.encode(format_instruction(instruction))
    response = TOK.encode(output) + [TOK.eos_id]

    # Room for the header, the whole response and a little input: only the input shrinks.
    limit = len(header) + len(response) + 10
    ids, n_prompt, truncated = encode_example(instruction, long_input, output, limit)
    assert truncated and len(ids) <= limit and ids[n_prompt:] == response
    prompt = TOK.decode(ids[:n_prompt])
    assert prompt.startswith(f"### Instruction:\n{instruction}\n\n### Input:\nword") and prompt.endswith(
        "### Response:\n")

    # No room for all of the response: the input is gone, the response is cut and has no EOS.
    ids, n_prompt, truncated = encode_example(instruction, long_input, output, len(header) + 3)
    assert truncated and ids[:n_prompt] == header and ids[n_prompt:] == response[:3]
    assert TOK.eos_id not in ids

    # Not even one response token fits after the instruction: the example is skipped.
    assert encode_example(instruction, long_input, output, len(header)) is None


def test_batches_are_padded_to_their_longest_example():
    samples = [finetune.make_sample(*finetune.encode_example(ALPACA, {"instruction": q, "input": "", "output": a}, 100)[:2])
               for q, a in [("Hi?", "Hello."), ("Name three colors.", "Red, green and blue are colors.")]]
    x, y = finetune.pad_batch(samples, pad_id=TOK.eos_id)
    assert x.shape == y.shape == (2, max(len(s[0]) for s in samples))
    short = len(samples[0][0])
    assert (x[0, short:] == TOK.eos_id).all() and (y[0, short:] == -100).all()
    assert torch.equal(y[1], samples[1][1])


# ---------------------------------------------------------------------------------------------
# Config, base checkpoint and folders
# ---------------------------------------------------------------------------------------------


def test_architecture_comes_from_the_base_and_a_mismatch_names_the_field(tmp_path, tiny_ckpt):
    cfg = finetune.load_finetune_config(sft_config(tmp_path, tiny_ckpt))
    base, model_cfg = finetune.read_base(cfg)
    assert vars(model_cfg) == base["meta"]["model_config"]

    same = finetune.load_finetune_config(sft_config(tmp_path, tiny_ckpt), ["model.d_model=32", "model.dropout=0.1"])
    assert finetune.read_base(same)[1].dropout == 0.1  # dropout may change; repeating a dim is fine
    wrong = finetune.load_finetune_config(sft_config(tmp_path, tiny_ckpt), ["model.n_layers=3"])
    with pytest.raises(UsageError, match=r"model\.n_layers is 3 in the config but 2 in the base"):
        finetune.read_base(wrong)


def test_checkpoints_go_to_their_own_folder(tmp_path, tiny_ckpt):
    path = sft_config(tmp_path, tiny_ckpt)
    raw = yaml.safe_load(path.read_text())
    del raw["training"]["checkpoint_dir"]
    path.write_text(yaml.safe_dump(raw))
    assert finetune.load_finetune_config(path).training.checkpoint_dir == "checkpoints/sft"
    into_base = finetune.load_finetune_config(path, [f"training.checkpoint_dir={tiny_ckpt.parent}"])
    with pytest.raises(UsageError, match="own folder"):
        finetune.read_base(into_base)


def test_missing_base_names_the_command_that_makes_it(tmp_path):
    cfg = finetune.load_finetune_config(sft_config(tmp_path, tmp_path / "nothing.ckpt"))
    with pytest.raises(UsageError, match="python train.py --config config_smoke.yaml"):
        finetune.read_base(cfg)


def test_dry_run_checks_the_base_but_builds_no_model(tmp_path, tiny_ckpt):
    """--dry-run checks the base's weights against its architecture by shapes only (the meta device: no memory,
    no initialisation), builds no model, and starts no Lightning Trainer or process."""
    code = ("import sys, torch, model, finetune\n"
            "build = model.Transformer.__init__\n"
            "def shapes_only(self, *a, **k):\n"
            "    assert torch.empty(0).device.type == 'meta', 'a model was built'\n"
            "    build(self, *a, **k)\n"
            "model.Transformer.__init__ = shapes_only\n"
            f"assert finetune.main(['--config', {str(sft_config(tmp_path, tiny_ckpt))!r}, '--dry-run']) == 0\n"
            "assert 'pytorch_lightning' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "257 train and 20 val examples" in out and "supervised" in out and "epochs" in out
    assert not (tmp_path / "sft").exists()


def test_show_example_marks_the_supervised_tokens(tmp_path, tiny_ckpt, capsys):
    assert finetune.main(["--config", str(sft_config(tmp_path, tiny_ckpt)), "--show-example", "0"]) == 0
    out = capsys.readouterr().out
    assert "data/tiny_instructions.jsonl:1" in out
    assert "### Response:\n[[A token is a small piece" in out and "[[' piece']]" in out
    assert "(truncated)" in out and "<|endoftext|>" not in out  # seq_len 32 cuts this response: no EOS


# ---------------------------------------------------------------------------------------------
# Data sources and bad records
# ---------------------------------------------------------------------------------------------


def write_records(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ('{"instruction": "Say hi."}', r"bad\.jsonl:3: record has no 'output'"),
    ("this is not json", r"bad\.jsonl:3: not valid JSON"),
    ('{"instruction": "Add.", "input": 3, "output": "4"}', r"bad\.jsonl:3: record has a non-string 'input'"),
    ('{"instruction": 5, "output": "x"}', r"bad\.jsonl:3: record has a non-string 'instruction'"),
    ('{"instruction": "Hi", "output": null}', r"bad\.jsonl:3: record has no 'output'"),
    ('["Say hi.", "Hi."]', r"bad\.jsonl:3: expected a JSON object with 'instruction' and 'output'"),
])
def test_bad_record_is_reported_with_its_line(tmp_path, tiny_ckpt, bad_line, message):
    good = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    records = write_records(tmp_path / "bad.jsonl", [good, good, bad_line, good, good])
    config = sft_config(tmp_path, tiny_ckpt)
    with pytest.raises(UsageError, match=message):
        finetune.main(["--config", str(config), "--dry-run", "--set", f"data.dataset={records}",
                       "--set", "data.val_docs=1"])


def test_bad_record_exits_2_with_one_line(tmp_path, tiny_ckpt):
    records = write_records(tmp_path / "bad.jsonl", ['{"instruction": "Hi", "output": "Hello"}', '{"output": "x"}'])
    result = run_script("finetune.py", "--config", sft_config(tmp_path, tiny_ckpt), "--dry-run",
                        "--set", f"data.dataset={records}", "--set", "data.val_docs=1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {records}:2: record has no 'instruction' (each record needs " \
                                    "instruction and output, input is optional)"


def test_datasets_library_path_reads_the_same_records(tmp_path, tiny_ckpt):
    """data.dataset: json + data.data_files goes through datasets.load_dataset, as a Hub name would."""
    config = sft_config(tmp_path, tiny_ckpt)
    local = finetune.load_finetune_config(config)
    hub = finetune.load_finetune_config(config, ["data.dataset=json", "data.split=train",
                                                 f"data.data_files={ROOT / 'data' / 'tiny_instructions.jsonl'}"])
    local_train, local_val, _ = finetune.load_records(local.data)
    hub_train, hub_val, how = finetune.load_records(hub.data)
    everything = [r[1:] for r in local_train + local_val]
    assert [r[1:] for r in hub_train] == everything[:-20]  # one held-out rule: the LAST val_docs, whatever the reader
    assert [r[1:] for r in hub_val] == [r[1:] for r in local_val] == everything[-20:]
    assert "last 20 records" in how and hub_val[0][0] == f"json row {len(everything) - 20}"


# ---------------------------------------------------------------------------------------------
# Training: it learns, checkpoints are SFT ones, resume works
# ---------------------------------------------------------------------------------------------


def response_loss(ckpt, samples) -> float:
    """Mean loss on the supervised (response) tokens of `samples` under the weights in `ckpt`."""
    model, _ = load_model(str(ckpt))
    x, y = finetune.pad_batch(samples, TOK.eos_id)
    with torch.no_grad():
        return float(training.token_loss(model(x), y))


def test_finetuning_lowers_response_loss_and_resumes(tmp_path, tiny_ckpt, capsys):
    config = sft_config(tmp_path, tiny_ckpt, max_steps=20, val_every=10, save_every=10, lr=3e-3)
    assert finetune.main(["--config", str(config), "--set", "training.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "starting from the base weights" in out and "supervised tok/s" in out and "val_acc" in out
    assert finetune.main(["--config", str(config)]) == 0  # the same command again: resumes
    assert "resuming from" in capsys.readouterr().out

    final = tmp_path / "sft" / "final.ckpt"
    meta = read_meta(str(final))
    assert meta["kind"] == "sft" and meta["step"] == 20
    assert meta["config"]["finetune"]["base_checkpoint"] == str(tiny_ckpt)
    assert meta["model_config"] == read_meta(str(tiny_ckpt))["model_config"]
    assert sorted(p.name for p in tiny_ckpt.parent.glob("*.ckpt")) == sorted(
        p.name for p in tiny_ckpt.parent.glob("*.ckpt") if "sft" not in p.name)  # nothing written beside the base

    cfg = finetune.load_finetune_config(config)
    train_records, _, _ = finetune.load_records(cfg.data)
    samples, _ = finetune.build_examples(train_records[:64], ALPACA, cfg.training.seq_len + 1)
    before, after = response_loss(tiny_ckpt, samples), response_loss(final, samples)
    assert after < before - 0.5, (before, after)


# ---------------------------------------------------------------------------------------------
# Plateau LR cuts and early stopping (training.after_validation, used by train.py and finetune.py)
# ---------------------------------------------------------------------------------------------


def test_plateau_cut_survives_the_schedule_and_does_not_reset_early_stopping(tmp_path, tiny_ckpt):
    cfg = finetune.load_finetune_config(sft_config(tmp_path, tiny_ckpt), [
        "training.lr_schedule=plateau", "training.warmup_ratio=0", "training.max_steps=100",
        "training.reduce_on_plateau.patience=2", "training.reduce_on_plateau.factor=0.5",
        "training.early_stopping.enabled=true", "training.early_stopping.patience=5"])
    t, state = cfg.training, training.TrainState()
    lrs, stops = [], []
    for val_loss in [2.0, 2.1, 2.1, 2.1, 2.1, 2.1]:  # one improvement, then five stale validations
        cut, stop = training.after_validation(state, val_loss, t)
        stops.append(stop)
        for _ in range(3):  # training steps between validations: the schedule keeps the cut LR
            lrs.append(t.lr * training.lr_multiplier(state.step, t, plateau_scale=state.plateau_scale))
            state.step += 1
    lr = t.lr
    assert lrs[::3] == pytest.approx([lr, lr, lr / 2, lr / 2, lr / 4, lr / 4])
    assert lrs[1::3] == lrs[::3] and lrs[2::3] == lrs[::3]
    assert stops == [False] * 5 + [True] and state.stale == 5  # the two cuts did not reset the stopping count
    assert (state.plateau_best, state.stale, state.stale_since_cut) == (2.0, 5, 1)
