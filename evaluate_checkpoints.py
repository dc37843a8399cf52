"""Rank checkpoints on small prompt -> target cases: which checkpoint is best, in seconds.

Examples:
    python evaluate_checkpoints.py                                          # checkpoints/*.ckpt on cases/wiki_basics.yaml
    python evaluate_checkpoints.py --checkpoints 'checkpoints/*.ckpt' --cases cases/tiny_corpus.yaml
    python evaluate_checkpoints.py --checkpoints checkpoints/ --cases cases/ --json eval.json --csv eval.csv
    python evaluate_checkpoints.py --checkpoints checkpoints/best.ckpt checkpoints/final.ckpt \\
        --cases cases/wiki_basics.yaml,cases/wiki_facts.yaml --top-k 10 --max-checkpoints 5

A case file is a YAML or JSON list of {name?, prompt, target?}. Targets keep their leading space
(" Paris"), because "is Paris" is tokenized as "is" + " Paris". --cases takes a file, a glob, a
folder (every .yaml/.yml/.json in it) or a comma-separated list of those; a case that appears in
several files (same prompt and target) is reported and counted once.

Each prompt is fed as infer.py feeds it (infer.start_ids: the text as written), so the ranking
scores the conditioning users sample with; the target is scored by eval_val.py's scorer. Per case: the top-k next tokens and their probabilities, P(first target token), its rank, whether
it is the top-1 token, the summed NLL of the whole target (teacher forcing), and whether greedy
decoding (with the KV cache) reproduces the target's tokens exactly.
Per checkpoint: token-weighted average NLL over all target tokens, its perplexity, top-1 accuracy
on first target tokens, greedy exact-match rate; checkpoints are ranked by average NLL.
--json FILE writes everything; --csv FILE writes one row per checkpoint to FILE and one row per
(checkpoint, case) to FILE_cases.csv. Hard links (last.ckpt = final.ckpt) are evaluated once.
"""

import argparse
import csv
import glob
import json
import math
import os

import torch

import infer
from checkpoint import same_files
from cli import UsageError, check_output_file, pick_device, run_cli
from config import load_config
from eval_val import score_logits
from tokenizer import tokenizer_for_checkpoint

CASE_KEYS = {"name", "prompt", "target"}
GREEDY_TOKENS_WITHOUT_TARGET = 8  # what a case with no target shows of the model's own continuation

# ---------------------------------------------------------------------------------------------
# Inputs: checkpoints and case files
# ---------------------------------------------------------------------------------------------


def expand(spec: str, extensions: tuple) -> list[str]:
    """A file, a folder (its files with these extensions) or a glob -> sorted paths.

    An existing file or folder is taken as it is named, never as a pattern: `runs/exp[1]` is that folder.
    """
    if os.path.isdir(spec):
        found = glob.glob(os.path.join(glob.escape(spec), "*"))
        return sorted(p for p in found if p.endswith(extensions) and os.path.isfile(p))
    if os.path.isfile(spec):
        return [spec]
    return sorted(p for p in glob.glob(spec) if os.path.isfile(p))


def find_checkpoints(specs: list[str]) -> list[dict]:
    """[{path, aliases}] of distinct files: hard links to one file are listed once, with their other names."""
    paths = []
    for spec in specs:
        found = expand(spec, (".ckpt",))
        if not found:
            raise UsageError(f"no checkpoint matches {spec!r}: train one first, or check the path with `python list.py`")
        paths += found
    return [{"path": names[0], "aliases": names[1:]} for names in same_files(paths)]


def read_case_file(path: str) -> list[dict]:
    """The cases of one YAML/JSON file, checked: a list of mappings with a non-empty string prompt."""
    import yaml  # JSON is YAML, so one parser reads both

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"case file {path}: syntax error{where}: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"case file {path}: cannot read it ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"case file {path} must be a non-empty list of {{name, prompt, target}} entries")
    cases = []
    for i, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise UsageError(f"case file {path}: entry {i} must be a mapping with a prompt, got {item!r}")
        unknown = set(item) - CASE_KEYS
        if unknown:
            raise UsageError(f"case file {path}: entry {i} has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                             "(allowed: name, prompt, target)")
        prompt, target = item.get("prompt"), item.get("target")
        if not isinstance(prompt, str) or not prompt:
            raise UsageError(f"case file {path}: entry {i} needs a non-empty string 'prompt'")
        if target is not None and (not isinstance(target, str) or not target):
            raise UsageError(f"case file {path}: entry {i}: 'target' must be a non-empty string (or left out)")
        name = str(item.get("name") or f"{os.path.splitext(os.path.basename(path))[0]}_{i}")
        cases.append({"name": name, "prompt": prompt, "target": target, "source": path})
    return cases


def load_cases(spec: str) -> tuple[list[dict], list[dict]]:
    """(cases, duplicates) from a comma list of files, globs and folders; a repeated case counts once."""
    paths = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        found = expand(part, (".yaml", ".yml", ".json"))
        if not found:
            raise UsageError(f"no case file matches {part!r}: give a .yaml/.json file, a folder or a glob (see cases/)")
        paths += [p for p in found if p not in paths]
    cases = []
    duplicates = []
    seen = {}
    names = set()
    for path in paths:
        for case in read_case_file(path):
            key = (case["prompt"], case["target"])
            if key in seen:
                duplicates.append({"name": case["name"], "source": path, "same_as": seen[key]["name"]})
                continue
            if case["name"] in names:  # same name, different content: keep both, tell them apart
                case["name"] = f"{os.path.splitext(os.path.basename(path))[0]}:{case['name']}"
            seen[key] = case
            names.add(case["name"])
            cases.append(case)
    return cases, duplicates


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def score_case(model, head, tokenizer, case: dict, top_k: int, device) -> dict:
    """Next-token top-k after the prompt; with a target: its NLL, first-token probability and rank, greedy match.

    head: infer.decode_head(model), for the greedy continuation (infer.generate).
    """
    prompt = infer.start_ids(tokenizer, case["prompt"])
    target = tokenizer.encode(case["target"]) if case["target"] else []
    room = model.config.max_seq_len - len(target)
    if room < 1:
        raise UsageError(f"case {case['name']}: its target alone has {len(target)} tokens, more than the model's "
                         f"max_seq_len {model.config.max_seq_len}: shorten it")
    prompt = prompt[-room:]  # a long prompt keeps its end, next to the target
    ids = torch.tensor([prompt + target], device=device)
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) - 1:-1] = ids[0, len(prompt):]  # position i predicts token i + 1: the target's tokens
    logits = model(ids)  # (1, T, vocab_size)
    first_logp = logits[0, len(prompt) - 1].float().log_softmax(-1)  # (vocab_size,) the next token after the prompt
    top = first_logp.topk(min(top_k, first_logp.shape[-1]))
    result = {"name": case["name"], "prompt": case["prompt"], "target": case["target"],
              "top_k": [{"token": tokenizer.decode([int(i)]), "prob": math.exp(float(v))}
                        for v, i in zip(top.values, top.indices)]}
    steps = infer.generate(model, prompt, len(target) or GREEDY_TOKENS_WITHOUT_TARGET, {"temperature": 0}, [None],
                           head=head)
    produced = [int(tokens[0]) for tokens, _ in steps]
    result["greedy"] = tokenizer.decode(produced)
    if not target:
        return result
    first = first_logp[target[0]]
    result.update({
        "p_first": math.exp(float(first)),
        "rank_first": int((first_logp > first).sum()) + 1,  # 1 = the model's top choice
        "top1_hit": bool((first_logp > first).sum() == 0),
        "target_nll": float(score_logits(logits, labels).nll_sum),
        "target_tokens": len(target),
        "greedy_match": produced == target,
    })
    return result


def summarize(case_results: list[dict]) -> dict:
    """Per-checkpoint numbers over the cases that have a target."""
    scored = [r for r in case_results if r["target"]]
    if not scored:
        return {"avg_nll": None, "ppl": None, "top1_acc": None, "exact_match": None, "cases": 0, "target_tokens": 0}
    tokens = sum(r["target_tokens"] for r in scored)
    avg_nll = sum(r["target_nll"] for r in scored) / tokens  # token-weighted: long targets weigh more
    return {"avg_nll": avg_nll, "ppl": math.exp(min(avg_nll, 700)),
            "top1_acc": sum(r["top1_hit"] for r in scored) / len(scored),
            "exact_match": sum(r["greedy_match"] for r in scored) / len(scored),
            "cases": len(scored), "target_tokens": tokens}


def evaluate_checkpoint(entry: dict, cases: list[dict], tokenizer_name: str, top_k: int, device, tokenizers: dict,
                        force_tokenizer: bool = False) -> dict:
    model, ckpt = infer.load_model(entry["path"], device)
    head = infer.decode_head(model)  # once per checkpoint, for every case's greedy continuation
    meta = ckpt["meta"]
    key = (meta.get("tokenizer_sha256") or meta.get("tokenizer"), tokenizer_name, model.config.vocab_size)
    if key not in tokenizers:  # built once per tokenizer, checked against each vocabulary size
        tokenizers[key] = tokenizer_for_checkpoint(ckpt, tokenizer_name, force=force_tokenizer)
    results = [score_case(model, head, tokenizers[key], case, top_k, device) for case in cases]
    return {"path": entry["path"], "aliases": entry["aliases"], "step": meta.get("step"), "kind": meta.get("kind"),
            **summarize(results), "case_results": results}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def label(entry: dict) -> str:
    names = [os.path.basename(entry["path"])] + [os.path.basename(a) for a in entry["aliases"]]
    return " = ".join(names)


def print_report(checkpoints: list[dict], cases: list[dict], top_k: int) -> None:
    width = max(len(label(c)) for c in checkpoints + [{"path": "checkpoint", "aliases": []}])
    print(f"\n{'checkpoint':<{width}}  {'step':>7}  {'kind':<8}  {'avg NLL':>8}  {'ppl':>10}  {'top-1':>6}  {'exact':>6}")
    for c in checkpoints:
        print(f"{label(c):<{width}}  {_fmt(c['step'], '>7')}  {c['kind'] or '-':<8}  {_fmt(c['avg_nll'], '>8.3f')}  "
              f"{_fmt(c['ppl'], '>10.1f')}  {_fmt(c['top1_acc'], '>6.0%')}  {_fmt(c['exact_match'], '>6.0%')}")
    ranked = [c for c in checkpoints if c.get("rank")]
    if ranked:
        print("\nranking by average NLL over target tokens (lower is better):")
        for c in sorted(ranked, key=lambda c: c["rank"]):
            print(f"  {c['rank']}. {label(c)}  (avg NLL {c['avg_nll']:.3f}, step {c['step']})")
    best = min(ranked, key=lambda c: c["rank"]) if ranked else checkpoints[-1]
    print(f"\nper case, {label(best)}:")
    name_width = min(32, max(len(r["name"]) for r in best["case_results"]))
    print(f"{'case':<{name_width}}  {'P(first)':>8}  {'rank':>6}  {'NLL':>7}  {'greedy':<20}  top-{top_k} next tokens")
    for r in best["case_results"]:
        mark = "" if r["target"] is None else (" ok" if r["greedy_match"] else " x")
        greedy_text = (repr(r["greedy"]) + mark)[:20]
        top = ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in r["top_k"])
        print(f"{r['name'][:name_width]:<{name_width}}  {_fmt(r.get('p_first'), '>8.3f')}  "
              f"{_fmt(r.get('rank_first'), '>6')}  {_fmt(r.get('target_nll'), '>7.2f')}  {greedy_text:<20}  {top}")


CHECKPOINT_FIELDS = ["rank", "path", "aliases", "step", "kind", "avg_nll", "ppl", "top1_acc", "exact_match", "cases",
                     "target_tokens"]
CASE_FIELDS = ["checkpoint", "step", "name", "prompt", "target", "p_first", "rank_first", "top1_hit", "target_nll",
               "target_tokens", "greedy", "greedy_match", "top_k"]


def write_csv(path: str, checkpoints: list[dict]) -> list[str]:
    """FILE: one row per checkpoint; FILE_cases.csv (same folder): one row per (checkpoint, case)."""
    cases_path = os.path.splitext(path)[0] + "_cases.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CHECKPOINT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for c in checkpoints:
            writer.writerow({**c, "aliases": ";".join(c["aliases"])})
    with open(cases_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CASE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for c in checkpoints:
            for r in c["case_results"]:
                top = " | ".join(f"{t['token']!r}:{t['prob']:.4f}" for t in r["top_k"])
                writer.writerow({**r, "checkpoint": c["path"], "step": c["step"], "top_k": top})
    return [path, cases_path]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=["checkpoints/*.ckpt"],
                        help="checkpoint files, globs or folders (default: 'checkpoints/*.ckpt')")
    parser.add_argument("--cases", default="cases/wiki_basics.yaml",
                        help="case file, glob, folder or comma-separated list (default: cases/wiki_basics.yaml)")
    parser.add_argument("--tokenizer", default="auto", help="auto (the copy each checkpoint carries), gpt2, or a "
                                                            "tokenizer folder: it must be the one they were trained with")
    parser.add_argument("--force-tokenizer", "--force_tokenizer", action="store_true",
                        help="use --tokenizer even though it is not the one the checkpoints were trained with")
    parser.add_argument("--config", help="take the tokenizer from this YAML config's data.tokenizer_name "
                                         "(only needed for checkpoints that record none)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--top-k", "--top_k", type=int, default=5, help="next tokens shown per case (default 5)")
    parser.add_argument("--max-checkpoints", "--max_checkpoints", type=int, default=None,
                        help="evaluate only the N checkpoints with the highest steps")
    parser.add_argument("--json", metavar="FILE", help="write every number (per case and per checkpoint) as JSON")
    parser.add_argument("--csv", metavar="FILE", help="write per-checkpoint rows to FILE and per-case rows to FILE_cases.csv")
    args = parser.parse_args(argv)
    if args.top_k <= 0 or (args.max_checkpoints is not None and args.max_checkpoints <= 0):
        parser.error("--top-k and --max-checkpoints must be positive integers")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json")
    cases, duplicates = load_cases(args.cases)  # bad case files fail before any model loads
    tokenizer_name = args.tokenizer
    if args.config and tokenizer_name == "auto":
        tokenizer_name = load_config(args.config).data.tokenizer_name
    device = pick_device(args.device)
    entries = find_checkpoints(args.checkpoints)
    from checkpoint import read_meta  # the step, without loading weights, to sort and cut

    for entry in entries:
        entry["step"] = read_meta(entry["path"]).get("step")
    entries.sort(key=lambda e: (e["step"] if e["step"] is not None else -1, e["path"]))
    if args.max_checkpoints:
        entries = entries[-args.max_checkpoints:]
    scored_cases = sum(1 for c in cases if c["target"])
    print(f"{len(cases)} cases ({scored_cases} with targets) from {args.cases}; "
          f"{len(entries)} checkpoints on {device}")
    for d in duplicates:
        print(f"note: case {d['name']} in {d['source']} repeats {d['same_as']}: counted once")

    tokenizers, checkpoints = {}, []
    for entry in entries:
        checkpoints.append(evaluate_checkpoint(entry, cases, tokenizer_name, args.top_k, device, tokenizers,
                                               args.force_tokenizer))
    ranked = sorted((c for c in checkpoints if c["avg_nll"] is not None), key=lambda c: c["avg_nll"])
    for rank, c in enumerate(ranked, 1):
        c["rank"] = rank
    print_report(checkpoints, cases, args.top_k)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cases": cases, "duplicates": duplicates, "checkpoints": checkpoints,
                       "ranking": [c["path"] for c in ranked]}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.csv:
        print(f"wrote {', '.join(write_csv(args.csv, checkpoints))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
