"""Instruction fine-tuning (SFT): teach a pretrained checkpoint to answer instructions and hold conversations.

Examples:
    python train.py --config config_smoke.yaml                  # the base model: checkpoints/final.ckpt
    python finetune.py --config config_finetune_smoke.yaml      # SFT on data/tiny_instructions.jsonl
    python finetune.py --config config_finetune_smoke.yaml --dry-run          # check everything, print the plan
    python finetune.py --config config_finetune_smoke.yaml --show-example 3   # which tokens are trained on?
    python finetune.py --config config_finetune_smoke.yaml --set finetune.lora.rank=8 --set training.lr=3e-3 \
        --set training.checkpoint_dir=checkpoints/sft_lora   # LoRA (lora.py): the base frozen, adapters trained
    python finetune.py --config config_finetune.yaml            # tatsu-lab/alpaca on top of checkpoints/final.ckpt
    python infer.py --ckpt checkpoints/sft/final.ckpt --prompt "What is a token?"   # infer.py adds the template

What is trained on: a record is {instruction, input (optional), output}, one user turn and its answer,
or {messages: [{role, content}, ...]}, a whole conversation (roles system, user, assistant). It goes through
the base checkpoint's chat template (chat.py, the one infer.py prompts with): an imported instruct model's
own (ChatML for SmolLM2), else ours, the Alpaca instruction template, where an instruction record becomes

    ### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n   <- prompt: labels -100
    {output}<|endoftext|>                                                     <- response + EOS: supervised

Only the assistant turns are supervised, each up to and including its end-of-turn token (--show-example
marks them). The model weights and architecture come from finetune.base_checkpoint; checkpoints go to
training.checkpoint_dir (checkpoints/sft by default, never the pretraining folder), are marked kind "sft"
and keep the template they were trained with. Running the same command again resumes, exactly as train.py does.
"""

import argparse
import dataclasses
import os

import torch

import training
from checkpoint import check_weights, load_checkpoint, load_weights
from cli import UsageError, run_cli
from config import apply_overrides, config_from_dict, read_yaml
from data import ShuffledPasses
from lora import add_lora, budget_line
from model import ModelConfig, Transformer
from chat import Chat, chat_template_for, check_messages, instruction_chat_template
from sources import split_records
from tokenizer import tokenizer_for_checkpoint

SFT_CHECKPOINT_DIR = "checkpoints/sft"  # default training.checkpoint_dir here: SFT never mixes with pretraining


# ---------------------------------------------------------------------------------------------
# Config and base checkpoint
# ---------------------------------------------------------------------------------------------


def load_finetune_config(path: str, overrides: list[str] | None = None):
    """load_config with a `finetune` section (its defaults if the file has none) and checkpoints in checkpoints/sft."""
    raw = apply_overrides(read_yaml(path), overrides)
    raw["training"] = {"checkpoint_dir": SFT_CHECKPOINT_DIR, **(raw.get("training") or {})}
    raw.setdefault("finetune", {})
    return config_from_dict(raw)


def read_base(cfg) -> tuple[dict, ModelConfig]:
    """The base checkpoint (memory-mapped: its weights are read when used) and the ModelConfig SFT will use."""
    path = cfg.finetune.base_checkpoint
    if not os.path.isfile(path):
        raise UsageError(f"base checkpoint not found: {path}; make it with `python train.py --config "
                         "config_smoke.yaml` (or the config it came from), or set finetune.base_checkpoint")
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    base, given = dict(meta["model_config"]), cfg.model
    for key, value in given.items():  # the base fixes the architecture; the config may only repeat it
        if key not in ModelConfig.ADJUSTABLE and base.get(key) != value:
            raise UsageError(f"model.{key} is {value} in the config but {base.get(key)} in the base checkpoint "
                             f"{path}: remove model.{key} (the base checkpoint defines the architecture)")
    model_cfg = ModelConfig(**{**base, **{k: v for k, v in given.items() if k in ModelConfig.ADJUSTABLE}})
    if cfg.training.seq_len > model_cfg.max_seq_len:
        raise UsageError(f"training.seq_len ({cfg.training.seq_len}) exceeds the base model's max_seq_len "
                         f"({model_cfg.max_seq_len}): set training.seq_len <= {model_cfg.max_seq_len}")
    same = os.path.abspath(cfg.training.checkpoint_dir) == os.path.dirname(os.path.abspath(path))
    if same:
        raise UsageError(f"training.checkpoint_dir {cfg.training.checkpoint_dir} holds the base checkpoint: SFT "
                         f"checkpoints need their own folder (e.g. {SFT_CHECKPOINT_DIR})")
    return ckpt, model_cfg


# ---------------------------------------------------------------------------------------------
# Records -> examples
# ---------------------------------------------------------------------------------------------


def check_record(item) -> tuple[str, dict]:
    """(where, record) of one (where, record) pair from sources.iter_records, checked, or a UsageError naming where.

    An instruction record comes back as {instruction, input, output} (input "" when left out), a conversation
    as {messages}.
    """
    where, record = item
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object with 'instruction' and 'output' (or 'messages'), "
                         f"got {record!r:.60}")
    if "messages" in record:
        try:
            messages = check_messages(record["messages"])
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise UsageError(f"{where}: the conversation has no assistant message, so nothing to learn from it")
        return where, {"messages": messages}
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            problem = "has no" if record.get(key) is None else "has a non-string"
            raise UsageError(f"{where}: record {problem} {key!r} (each record needs instruction and output, "
                             "input is optional)")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise UsageError(f"{where}: record has a non-string 'input' (input is optional text: a string, or left out)")
    return where, {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def load_records(data):
    """(train, val, how): checked records, held out by sources.split_records (the one held-out rule)."""
    train, val, how = split_records(data)  # (where, record) pairs from sources.iter_records
    return [check_record(r) for r in train], [check_record(r) for r in val], how


def chat_for_base(meta: dict, tokenizer) -> Chat:
    """The template SFT trains on: the base's own (an imported chat model's), else our instruction template."""
    return Chat(chat_template_for(meta) or instruction_chat_template(), tokenizer)


def encode_example(chat: Chat, record: dict, max_tokens: int):
    """(ids, trained, truncated) for one checked record, or None when not even one trained token fits.

    trained[i] says whether ids[i] is a token the model learns to produce (chat.Chat.encode: the assistant
    turns and their end-of-turn tokens). Each prompt is encoded ALONE, exactly as infer.py encodes it, and
    each reply separately: encoding prompt + reply as one string can let a tokenizer merge tokens across the
    boundary (tokenizers that glue a newline or space to the next word do), which would train the model on
    a prompt ending that inference never produces. With GPT-2's BPE the two ways agree on every bundled
    record (tests/test_finetune.py checks it); this way is right for any tokenizer.

    Too long (> max_tokens): an instruction record's input text is trimmed first, then the end is cut
    (a cut reply has no end-of-turn: it did not end there). The instruction and the headers are never cut.
    """
    if "messages" in record:
        ids, trained = chat.encode(record["messages"])
        return fit(ids, trained, max_tokens, truncated=False)
    input_text, input_ids = record["input"], chat.tokenizer.encode(record["input"].strip())
    trimmed = False
    while True:
        messages = [chat.user_message(record["instruction"], input_text),
                    {"role": "assistant", "content": record["output"].strip()}]
        ids, trained = chat.encode(messages)
        excess = len(ids) - max_tokens
        if excess <= 0 or not input_ids:
            return fit(ids, trained, max_tokens, truncated=trimmed)
        input_ids = input_ids[:max(0, len(input_ids) - excess)]
        input_text, trimmed = chat.tokenizer.decode(input_ids), True


def fit(ids: list[int], trained: list[bool], max_tokens: int, truncated: bool):
    """encode_example's answer: the first max_tokens tokens, or None when none of them is trained."""
    if True not in trained[:max_tokens]:
        return None
    return ids[:max_tokens], trained[:max_tokens], truncated or len(ids) > max_tokens


def make_sample(ids: list[int], trained: list[bool]):
    """(x, y) for next-token training: y = ids shifted left, -100 where the target is not a trained token.

    y[i] is the token after x[i]; the first supervised target is the first reply token, predicted
    from the last prompt token (the newline after "### Response:").
    """
    import torch

    tokens = torch.tensor(ids)
    x, y = tokens[:-1], tokens[1:].clone()
    y[~torch.tensor(trained[1:], dtype=torch.bool)] = -100
    return x, y


def pad_batch(samples, pad_id: int):
    """Collate (x, y) pairs of different lengths: pad to the longest in this batch.

    Padding goes on the right with label -100: causal attention never lets a real token see the
    padding after it, and padded positions are not scored.
    """
    import torch

    longest = max(len(x) for x, _ in samples)
    x = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    y = torch.full((len(samples), longest), -100, dtype=torch.long)
    for row, (xs, ys) in enumerate(samples):
        x[row, :len(xs)], y[row, :len(ys)] = xs, ys
    return x, y


def build_examples(records, chat: Chat, max_tokens: int):
    """(samples, stats): (x, y) pairs for the records that fit, and counts for the plan."""
    samples, stats = [], {"skipped": 0, "truncated": 0, "tokens": 0, "supervised": 0}
    for _, record in records:
        encoded = encode_example(chat, record, max_tokens)
        if encoded is None:
            stats["skipped"] += 1
            continue
        ids, trained, truncated = encoded
        stats["truncated"] += truncated
        stats["tokens"] += len(ids) - 1
        stats["supervised"] += sum(trained[1:])
        samples.append(make_sample(ids, trained))
    return samples, stats


def padded_tokens_per_epoch(samples, batch_size: int, seed: int) -> int:
    """Positions computed in one pass (padding included), batching in the training order of epoch 0."""
    order = ShuffledPasses(samples, seed).order(0).tolist()
    full_batches = range(0, max(len(order) - batch_size + 1, 1), batch_size)  # training drops the last partial one
    batches = [order[i:i + batch_size] for i in full_batches]
    return sum(len(b) * max(len(samples[i][0]) for i in b) for b in batches)


# ---------------------------------------------------------------------------------------------
# What the learner sees: the plan and one example
# ---------------------------------------------------------------------------------------------


def plan_lines(cfg, base_meta, model_cfg, tokenizer, how, train, val, stats, world_size: int) -> list[str]:
    train_cfg = cfg.training
    padded = padded_tokens_per_epoch(train, train_cfg.micro_batch_size, train_cfg.seed)
    per_step = training.sequences_per_step(train_cfg, world_size)
    return [
        f"base: {cfg.finetune.base_checkpoint} ({base_meta.get('kind')}, step {base_meta.get('step')}; "
        f"{model_cfg.n_layers} layers, d_model {model_cfg.d_model}, {model_cfg.n_heads} heads / "
        f"{model_cfg.n_kv_heads} kv heads, max_seq_len {model_cfg.max_seq_len}); tokenizer {tokenizer.spec}",
        f"data: {len(train):,} train and {len(val):,} val examples ({how}); {stats['truncated']} truncated, "
        f"{stats['skipped']} skipped (instruction longer than seq_len+1 = {train_cfg.seq_len + 1} tokens)",
        f"tokens: {stats['tokens']:,} train tokens, {stats['supervised']:,} supervised "
        f"({100 * stats['supervised'] / max(stats['tokens'], 1):.0f}%); per-batch padding adds "
        f"{100 * (padded / max(stats['tokens'], 1) - 1):.0f}% at micro_batch_size {train_cfg.micro_batch_size}",
        f"batch: {per_step} examples per optimizer step = {train_cfg.micro_batch_size} x {train_cfg.grad_accum_steps} accum x "
        f"{world_size} devices; {training.step_budget(train_cfg, per_step / max(len(train), 1))}; "
        f"checkpoints -> {train_cfg.checkpoint_dir}",
    ]


def show_example(records, n: int, chat: Chat, max_tokens: int, n_train: int) -> None:
    """Print record n (file order) as the model trains on it, supervised tokens inside [[ ]]."""
    if not 0 <= n < len(records):
        raise UsageError(f"--show-example {n}: there are {len(records)} records (0 to {len(records) - 1})")
    where, record = records[n]
    encoded = encode_example(chat, record, max_tokens)
    role = "training" if n < n_train else "validation"
    if encoded is None:
        print(f"example {n} ({where}, {role}) is skipped: its prompt alone exceeds seq_len+1 = {max_tokens} tokens")
        return
    ids, trained, truncated = encoded
    print(f"example {n} ({where}, {role}): {len(ids)} tokens, {sum(trained)} supervised"
          f"{' (truncated)' if truncated else ''}. Trained on = inside [[ ]]; the rest is context (label -100).\n")
    spans, start = [], 0  # runs of tokens that are all trained, or all context
    for k in range(1, len(ids) + 1):
        if k == len(ids) or trained[k] != trained[start]:
            text = chat.tokenizer.decode(ids[start:k])
            spans.append(f"[[{text}]]" if trained[start] else text)
            start = k
    print("".join(spans) + "\n")
    pieces = [repr(chat.tokenizer.decode([i])) for i in ids]
    print("tokens: " + " ".join(f"[[{p}]]" if t else p for p, t in zip(pieces, trained)))


class PadWith:
    """pad_batch with a fixed pad id, as a picklable object (DataLoader workers need to pickle it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples):
        return pad_batch(samples, self.pad_id)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with a finetune: section (see config_finetune.yaml)")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="check config, data and base checkpoint, print the plan, exit without training")
    parser.add_argument("--show-example", "--show_example", type=int, metavar="N",
                        help="print record N (0-based, file order) with its supervised tokens marked, then exit")
    parser.add_argument("--no_resume", "--no-resume", action="store_true",
                        help="ignore checkpoints in training.checkpoint_dir and start again from the base")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.max_steps=20 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # 1. Arguments, config, the base checkpoint and the tokenizer it carries.
    args = parse_args(argv)
    cfg = load_finetune_config(args.config, args.set)
    train_cfg = cfg.training
    base, model_cfg = read_base(cfg)
    base_meta = base["meta"]
    tokenizer = tokenizer_for_checkpoint(base, "auto", cfg.data.offline)  # the base's own tokenizer
    chat = chat_for_base(base_meta, tokenizer)

    # 2. Records -> examples (labels -100 but on assistant turns), checked before anything heavy.
    train_records, val_records, how = load_records(cfg.data)
    max_tokens = train_cfg.seq_len + 1  # seq_len inputs, each with its next-token target
    if args.show_example is not None:
        show_example(train_records + val_records, args.show_example, chat, max_tokens, len(train_records))
        return 0
    train, stats = build_examples(train_records, chat, max_tokens)
    val, _ = build_examples(val_records, chat, max_tokens)
    if not train or not val:
        raise UsageError(f"no {'training' if not train else 'validation'} example fits in seq_len+1 = {max_tokens} "
                         "tokens: raise training.seq_len, add records, or adjust data.val_docs")
    lora_cfg = cfg.finetune.lora  # None: full fine-tuning
    lora_settings = dataclasses.asdict(lora_cfg) if lora_cfg else None
    resume_from = None if args.no_resume or not train_cfg.auto_resume else training.find_resume_checkpoint(
        train_cfg.checkpoint_dir, model_cfg, tokenizer, "sft", lora_settings)
    if args.dry_run:
        check_weights(base["state_dict"], model_cfg, cfg.finetune.base_checkpoint)
        with torch.device("meta"):  # shapes only, for the trainable-parameter line
            shapes = Transformer(model_cfg)
            if lora_cfg:
                add_lora(shapes, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.targets)
        print("\n".join(plan_lines(cfg, base_meta, model_cfg, tokenizer, how, train, val, stats,
                                   training.start_fabric(cfg, launch=False)[0].world_size)
                        + [budget_line(shapes, lora_settings)]))
        print("dry run: config, data and base checkpoint are valid; no model was built")
        return 0
    if training.already_done(resume_from, train_cfg):
        return 0

    # 3. Devices and processes: from here on this is one rank of the run (Lightning started the others).
    fabric, precision, why = training.start_fabric(cfg)

    # 4. The model with the base's weights (a resumed run gets its own from the SFT checkpoint), with LoRA
    #    adapters if asked (the base then frozen: lora.py), and its optimizer over what trains.
    fabric.seed_everything(train_cfg.seed, verbose=False)
    with fabric.init_module():
        model = Transformer(model_cfg)
    if not resume_from:
        load_weights(model, base["state_dict"], cfg.finetune.base_checkpoint)
    if lora_cfg:
        add_lora(model, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.targets)
    if train_cfg.compile:
        model.compile()
    optimizers, peak_lrs = training.make_optimizers(model, train_cfg)
    model, optimizers = training.setup(fabric, model, optimizers)

    # 5. Resume, then the loop (training.fit) and final.ckpt.
    state = training.restore(fabric, resume_from.path, model, optimizers, train_cfg) if resume_from else training.TrainState()
    plan = plan_lines(cfg, base_meta, model_cfg, tokenizer, how, train, val, stats, fabric.world_size) + [
        budget_line(model, lora_settings),
        f"resuming from {resume_from.path} at step {state.step}" if resume_from
        else f"starting from the base weights of {cfg.finetune.base_checkpoint}"]
    final = os.path.join(train_cfg.checkpoint_dir, "final.ckpt")
    run = training.Run(kind="sft", cfg=cfg, model_config=model_cfg, tokenizer=tokenizer,
                       tokens_per_epoch=padded_tokens_per_epoch(train, train_cfg.micro_batch_size, train_cfg.seed), plan=plan,
                       precision=precision, precision_why=why, chat_template=base_meta.get("chat_template"),
                       lora=lora_settings,
                       next_command=f"python infer.py --ckpt {final} --prompt \"What is a token?\"")
    return training.fit(fabric, run, model, optimizers, peak_lrs, train, val, state, collate_fn=PadWith(tokenizer.eos_id))


if __name__ == "__main__":
    run_cli(main)
