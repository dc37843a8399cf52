"""Did a fine-tune teach what it should, and does the model still know what it knew? Greedy replies, checked.

Examples (after the fine-tune of config_finetune_smollm2.yaml, see docs/PERFORMANCE.md):

    python check_replies.py --ckpt checkpoints/smollm2/base.ckpt checkpoints/smollm2/sft/final.ckpt
    python check_replies.py --ckpt checkpoints/smollm2/sft/final.ckpt --show        # every reply, PASS or FAIL
    python check_replies.py --ckpt checkpoints/smollm2/base.ckpt --cases cases/chat/general_questions.yaml
    python check_replies.py --ckpt checkpoints/smollm2/base.ckpt checkpoints/smollm2/sft/final.ckpt --json replies.json

Each checkpoint answers every case's prompt as infer.py's chat does: the prompt is one user message,
rendered through the checkpoint's chat template (chat.py; our instruction template when it carries none),
and the reply is decoded greedily by infer.generate up to the template's end of turn, EOS or the token limit. A case passes when its `expect` regular expression is found in the reply (re.search:
anchor it with ^ to test how the reply opens, add (?i) to ignore case).

A case file is a YAML list of {name?, prompt, expect, max_new_tokens?} (a case that looks only at how a reply
opens needs only its first tokens: a small max_new_tokens makes it fast); cases/chat/ holds the two that measure the recipe:
persona_heldout.yaml (prompts that are not in data/smollm2_persona.jsonl: does the new behaviour carry over?)
and general_questions.yaml (facts the base model gets right: did the fine-tune break them?). The last lines
print each file's share passing, first checkpoint -> last, e.g. "persona_heldout: 0/40 (0%) -> 38/40 (95%)".
"""

import argparse
import json
import os
import re
import sys

import torch

import infer
from chat import Chat, chat_template_for, instruction_chat_template
from checkpoint import read_meta
from cli import UsageError, check_output_file, pick_device, run_cli
from tokenizer import tokenizer_for_checkpoint

CASE_KEYS = {"name", "prompt", "expect", "max_new_tokens"}
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
          "no_repeat_ngram_size": 0}


# ---------------------------------------------------------------------------------------------
# Case files
# ---------------------------------------------------------------------------------------------


def read_cases(path: str) -> list[dict]:
    """The checked cases of one YAML file: [{name, prompt, expect (compiled), max_new_tokens, file}]."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f"case file {path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"case file {path}: cannot read it ({e}): give a YAML file like cases/chat/*.yaml") from None
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"case file {path} must be a non-empty YAML list of {{name, prompt, expect}} entries")
    cases = []
    for i, item in enumerate(raw, 1):
        where = f"case file {path}, entry {i}"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise UsageError(f"{where}: needs a non-empty string 'prompt' (and an 'expect' regular expression)")
        unknown = set(item) - CASE_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (allowed: name, prompt, expect, max_new_tokens)")
        if not isinstance(item.get("expect"), str) or not item["expect"]:
            raise UsageError(f"{where}: needs 'expect', a regular expression the reply must contain")
        try:
            expect = re.compile(item["expect"])
        except re.error as e:
            raise UsageError(f"{where}: 'expect' is not a valid regular expression ({e})") from None
        limit = item.get("max_new_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise UsageError(f"{where}: 'max_new_tokens' must be a positive integer (or left out), got {limit!r}")
        cases.append({"name": str(item.get("name") or f"{case_file_label(path)}_{i}"), "prompt": item["prompt"],
                      "expect": expect, "max_new_tokens": limit, "file": path})
    return cases


def case_file_label(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------


def reply(model, head, chat: Chat, message: str, max_new_tokens: int) -> str:
    """The greedy reply to one user message, up to (without) the token or text that ends a turn."""
    prompt_ids, _ = chat.encode([{"role": "user", "content": message}], add_generation_prompt=True)
    generator = torch.Generator(next(model.parameters()).device)  # unused at temperature 0, but generate takes one
    ids = []
    for tokens, _ in infer.generate(model, prompt_ids, max_new_tokens, GREEDY, [generator], head=head):
        token = int(tokens[0])
        if token in chat.stop_ids:
            break
        ids.append(token)
    text = chat.tokenizer.decode(ids)
    for stop in chat.stops:  # a multi-token end of turn, or the start of a next user turn
        text = text.split(stop)[0]
    return text.strip()


def check_checkpoint(path: str, cases: list[dict], max_new_tokens: int, device, show: bool) -> dict:
    """{path, kind, step, results: [{name, file, prompt, reply, passed}]} for one checkpoint."""
    model, ckpt = infer.load_model(path, device)
    meta = ckpt["meta"]
    chat = Chat(chat_template_for(meta) or instruction_chat_template(), tokenizer_for_checkpoint(ckpt))
    head = infer.decode_head(model)
    results = []
    for case in cases:
        text = reply(model, head, chat, case["prompt"], case["max_new_tokens"] or max_new_tokens)
        passed = case["expect"].search(text) is not None
        results.append({"name": case["name"], "file": case["file"], "prompt": case["prompt"], "reply": text,
                        "passed": passed})
        if show:
            print(f"  {'PASS' if passed else 'FAIL'} {case['name']}: {case['prompt']!r} -> {text!r}")
    return {"path": path, "kind": meta.get("kind"), "step": meta.get("step"), "results": results}


def share(results: list[dict], file: str) -> tuple[int, int]:
    """(passed, total) of one case file's results."""
    mine = [r for r in results if r["file"] == file]
    return sum(r["passed"] for r in mine), len(mine)


def fmt_share(passed: int, total: int) -> str:
    return f"{passed}/{total} ({100 * passed / total:.0f}%)"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True,
                        help="checkpoints to check, in order (the summary compares the first with the last)")
    parser.add_argument("--cases", nargs="+",
                        default=["cases/chat/persona_heldout.yaml", "cases/chat/general_questions.yaml"],
                        help="YAML case files of {name?, prompt, expect, max_new_tokens?} (default: the two in cases/chat/)")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=48,
                        help="longest reply, in tokens, for cases that set no max_new_tokens (default 48)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (default cpu)")
    parser.add_argument("--show", action="store_true", help="print every reply with PASS or FAIL")
    parser.add_argument("--json", metavar="FILE", help="write every reply and result as JSON")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json")
    files = list(dict.fromkeys(args.cases))  # a file named twice counts once
    cases = [case for path in files for case in read_cases(path)]  # bad case files fail before any model loads
    for path in args.ckpt:
        read_meta(path)  # a missing file or one that is not a checkpoint fails here, before the first model loads
    device = pick_device(args.device)
    print(f"{len(cases)} cases from {', '.join(files)}; {len(args.ckpt)} checkpoint(s) on {device}, "
          f"greedy replies of up to {args.max_new_tokens} tokens", file=sys.stderr)
    checked = []
    for i, path in enumerate(args.ckpt, 1):
        print(f"[{i}/{len(args.ckpt)}] {path}")
        entry = check_checkpoint(path, cases, args.max_new_tokens, device, args.show)
        for file in files:
            print(f"  {case_file_label(file)}: {fmt_share(*share(entry['results'], file))}")
        checked.append(entry)
    first, last = checked[0], checked[-1]
    for file in files:
        shares = [fmt_share(*share(entry["results"], file)) for entry in (first, last)]
        print(f"{case_file_label(file)}: {' -> '.join(shares) if len(checked) > 1 else shares[0]}")
    if args.json:
        summary = [{"path": e["path"], **{case_file_label(f): dict(zip(("passed", "total"), share(e["results"], f)))
                                          for f in files}} for e in checked]
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cases": files, "max_new_tokens": args.max_new_tokens, "summary": summary,
                       "checkpoints": checked}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
