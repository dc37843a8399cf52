"""check_replies.py: greedy chat replies checked against each case's regular expression, on tiny models, offline."""

import json
import re

import pytest
import torch
import yaml

import check_replies
import infer
from chat import Chat, instruction_chat_template
from checkpoint import load_checkpoint, save_checkpoint
from conftest import run_script
from tokenizer import tokenizer_for_checkpoint

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_cases(path, cases) -> str:
    path.write_text(yaml.safe_dump(cases))
    return str(path)


def greedy_text(ckpt_path, prompt_ids, n) -> str:
    """What the model says greedily after prompt_ids, n tokens, decoded: the reference a reply must start like."""
    model, ckpt = infer.load_model(str(ckpt_path))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokenizer_for_checkpoint(ckpt).decode(ids[0, len(prompt_ids):].tolist())


def test_reply_is_the_greedy_continuation_of_the_chat_prompt(tiny_ckpt):
    """The reply is what a plain argmax loop (no cache) gives after the rendered prompt, cut at EOS."""
    model, ckpt = infer.load_model(str(tiny_ckpt))
    tokenizer = tokenizer_for_checkpoint(ckpt)
    chat = Chat(instruction_chat_template(), tokenizer)
    text = check_replies.reply(model, infer.decode_head(model), chat, "The capital of France", 8)
    prompt_ids, _ = chat.encode([{"role": "user", "content": "The capital of France"}], add_generation_prompt=True)
    expected = greedy_text(tiny_ckpt, prompt_ids, 8).split(tokenizer.decode([tokenizer.eos_id]))[0]
    for stop in chat.stops:
        expected = expected.split(stop)[0]
    assert text == expected.strip()


def test_shares_per_case_file_first_to_last_and_json(tiny_ckpt, tmp_path):
    """A case passes when its regex is found in the reply; the summary line gives first -> last per file."""
    model, ckpt = infer.load_model(str(tiny_ckpt))
    chat = Chat(instruction_chat_template(), tokenizer_for_checkpoint(ckpt))
    said = check_replies.reply(model, infer.decode_head(model), chat, "Attention is", 6)
    assert said, "the tiny model should say something"
    always = write_cases(tmp_path / "always.yaml", [{"name": "any", "prompt": "Attention is", "expect": "(?s)."},
                                                    {"prompt": "Attention is", "expect": "^" + re.escape(said) + "$",
                                                     "max_new_tokens": 6}])
    never = write_cases(tmp_path / "never.yaml", [{"prompt": "Attention is", "expect": "^Tiny here!"}])
    out = tmp_path / "replies.json"
    result = run_script("check_replies.py", "--ckpt", tiny_ckpt, tiny_ckpt, "--cases", always, never,
                        "--max-new-tokens", "8", "--json", out, "--show")
    assert "always: 2/2 (100%) -> 2/2 (100%)" in result.stdout
    assert "never: 0/1 (0%) -> 0/1 (0%)" in result.stdout
    assert "FAIL never_1" in result.stdout
    report = json.loads(out.read_text())
    assert report["summary"][0]["always"] == {"passed": 2, "total": 2}
    assert [r["passed"] for r in report["checkpoints"][1]["results"]] == [True, True, False]


def test_chat_template_of_the_checkpoint_is_used_and_end_of_turn_stops(tiny_ckpt, tmp_path):
    """A checkpoint carrying a template is prompted through it; the reply ends at its end-of-turn text."""
    ckpt = load_checkpoint(str(tiny_ckpt), mmap=False)
    ckpt["meta"]["chat_template"] = CHATML
    path = tmp_path / "chatml.ckpt"
    save_checkpoint(ckpt, str(path))
    model, loaded = infer.load_model(str(path))
    tokenizer = tokenizer_for_checkpoint(loaded)
    chat = Chat(CHATML, tokenizer)
    prompt_ids, _ = chat.encode([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    entry = check_replies.check_checkpoint(str(path), [{"name": "hi", "prompt": "Hi", "expect": re.compile(""),
                                                        "max_new_tokens": 4, "file": "f.yaml"}], 4, "cpu", False)
    expected = greedy_text(path, prompt_ids, 4)  # the prompt is 27 GPT-2 tokens of a 32-token window
    for stop in ["<|endoftext|>", *chat.stops]:  # GPT-2 has no <|im_end|> token: the text stop ends the turn
        expected = expected.split(stop)[0]
    assert entry["results"][0]["reply"] == expected.strip()


@pytest.mark.parametrize("cases, message", [
    ("- {prompt: hi}\n", "needs 'expect'"),
    ("- {prompt: hi, expect: '('}\n", "not a valid regular expression"),
    ("- {prompt: hi, expect: x, target: y}\n", "unknown key(s) target"),
    ("- {prompt: hi, expect: x, max_new_tokens: 0}\n", "'max_new_tokens' must be a positive integer"),
    ("[]\n", "non-empty YAML list"),
    ("- {prompt: [unclosed\n", "not valid YAML"),
])
def test_bad_case_file_is_one_line_exit_2(tiny_ckpt, tmp_path, cases, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(cases)
    result = run_script("check_replies.py", "--ckpt", tiny_ckpt, "--cases", bad, check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_checkpoint_is_one_line_exit_2(tmp_path):
    result = run_script("check_replies.py", "--ckpt", tmp_path / "nope.ckpt", check=False)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_shipped_case_files_and_dataset_are_valid():
    """The recipe's files load, none of the held-out or general prompts is a training instruction."""
    heldout = check_replies.read_cases("cases/chat/persona_heldout.yaml")
    general = check_replies.read_cases("cases/chat/general_questions.yaml")
    with open("data/smollm2_persona.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    trained = {r["instruction"].strip().lower() for r in records}
    assert len(heldout) == 40 and len(general) == 15 and len(records) == len(trained) >= 200
    assert not trained & {c["prompt"].strip().lower() for c in heldout + general}
    persona = heldout[0]["expect"]
    assert all(persona.search(r["output"]) for r in records)  # every answer shows the behaviour
