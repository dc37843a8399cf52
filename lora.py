"""LoRA: fine-tune a large model by training two thin matrices beside each projection, not the projection.

A projection y = W x (W: out x in, frozen) becomes

    y = W x + (alpha / rank) * B (A dropout(x))          A: rank x in,  B: out x rank

A starts random (Kaiming-uniform, as PEFT does) and B at zero, so the adapted model starts exactly equal to
the base; training moves only A and B. With rank 8 on every projection of SmolLM2-135M that is 2.4M
trainable numbers instead of 135M: gradients and AdamW's two moments shrink by the same factor, and a step
skips the weight gradients of everything frozen. Since B A is one out x in matrix, merging folds it into W
for good (`merged_weight`): a plain Transformer again, exactly as fast as the base.

    model = Transformer(config); load_weights(model, base_state_dict, ...)
    add_lora(model, rank=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"])  # the rest frozen
    ... train ...
    merge_lora(model)                                        # plain nn.Linear layers, W + (alpha/rank) B A

finetune.py does this when its config has a `finetune.lora` section ({rank, alpha, dropout, targets}).

The checkpoints of a LoRA run hold the whole state dict: the base's weights under their usual names plus
`blocks.N.attn.q_proj.lora_A.weight` / `.lora_B.weight` for each adapter, and meta["lora"] = {rank, alpha,
dropout, targets}. So a LoRA checkpoint stands alone like any other (no base file to find later), a run
resumes from it bit for bit, and `convert.py to-peft` can still take the adapters out. Every script that
runs a model reads it through checkpoint.load_checkpoint, which merges the adapters (`merge_state_dict`):
infer.py, eval_val.py, explore.py, evaluate_checkpoints.py, convert.py to-hf/to-gguf and a later
finetune.py see a plain Transformer. (Storing only the adapters and a path to the base would make files of
a few MB, and every one of them broken the day the base moves; `to-peft` writes that small form on request.)

PEFT's format (Hugging Face's `peft` library, and the adapters people share on the Hub) is a folder:
adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...) and
adapter_model.safetensors, keyed by the Hugging Face Llama module names (convert.to_hf_name) behind PEFT's
own prefix: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight. `save_peft` writes it,
`load_peft` reads it back; tests/test_lora.py proves `peft.PeftModel.from_pretrained` on `convert.py to-hf`'s
export computes our logits.

    python convert.py to-peft --ckpt checkpoints/sft/final.ckpt --out adapter
    python convert.py from-peft --base checkpoints/final.ckpt --adapter adapter --out lora.ckpt
"""

import json
import math
import os

import torch
import torch.nn as nn

from cli import UsageError

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model's own names


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight plus a trainable low-rank update: W x + (alpha / rank) B(A(dropout(x))).

    The frozen matrix stays under the name `weight`, so the state dict keeps the base's names and adds
    `lora_A.weight` and `lora_B.weight` beside it.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight = base.weight  # the base's Parameter itself: nothing copied
        self.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's start: A random, B zero
        nn.init.zeros_(self.lora_B.weight)  # so B A = 0: training starts from the base model exactly
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x):
        return nn.functional.linear(x, self.weight) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))


def adapted_linears(model, targets) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every projection named in `targets`, in every block."""
    found = []
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            found += [(parent, name) for name in targets if hasattr(parent, name)]
    missing = [t for t in targets if not any(name == t for _, name in found)]
    if missing:
        raise UsageError(f"finetune.lora.targets names {missing}, which this model does not have "
                         f"(model.mlp {model.config.mlp}): remove {missing[0]}")
    return found


def add_lora(model, rank: int, alpha: float, dropout: float, targets) -> nn.Module:
    """Freeze every parameter of `model` and give each projection named in `targets` a trainable LoRA update.

    In place (returns the model). Call it after loading the base weights: the new A matrices draw from the
    global random generator, the B matrices are zero.
    """
    model.requires_grad_(False)
    for parent, name in adapted_linears(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


def merged_weight(weight, lora_A, lora_B, scale: float):
    """The one formula: W + scale * B A, an (out x in) matrix like W."""
    return weight + scale * (lora_B @ lora_A)


def merge_lora(model) -> nn.Module:
    """Fold every LoRA update into its frozen matrix and put plain nn.Linear layers back (in place)."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    plain = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=False, device="meta")
                    with torch.no_grad():  # (meta: no throw-away random init; the merged matrix replaces it)
                        plain.weight = nn.Parameter(merged_weight(child.weight, child.lora_A.weight,
                                                                  child.lora_B.weight, child.scale))
                    setattr(parent, name, plain)
    return model


def merge_state_dict(state_dict: dict, settings: dict, where: str) -> dict:
    """A LoRA checkpoint's state dict with every adapter folded in: the state dict of a plain Transformer."""
    scale = settings["alpha"] / settings["rank"]
    merged = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")]
            try:
                merged[module + ".weight"] = merged_weight(state_dict[module + ".weight"], state_dict[key],
                                                           state_dict[module + ".lora_B.weight"], scale)
            except (KeyError, RuntimeError) as e:  # a missing half, or shapes that do not multiply
                raise UsageError(f"{where}: the LoRA adapter of {module} is damaged ({type(e).__name__}: "
                                 f"{str(e)[:80]}): the file is damaged or not ours") from None
    return merged


def adapter_tensors(state_dict: dict) -> dict:
    """Only the adapters (lora_A, lora_B) of a LoRA state dict."""
    return {k: v for k, v in state_dict.items() if ".lora_" in k}


def describe(settings: dict | None) -> str:
    """'LoRA rank 8 (alpha 16) on q_proj, v_proj' or 'full fine-tuning', for plans and messages."""
    if not settings:
        return "full fine-tuning"
    return f"LoRA rank {settings['rank']} (alpha {settings['alpha']:g}) on {', '.join(settings['targets'])}"


def same_adapters(a: dict | None, b: dict | None) -> bool:
    """Whether two LoRA settings (None: full fine-tuning) make the same network; dropout may differ (it changes
    how a run trains, not what the model computes, like model.dropout)."""
    def network(s):
        return s and (s["rank"], s["alpha"], sorted(s["targets"]))
    return network(a) == network(b)


def budget_line(model, settings: dict | None) -> str:
    """The plan's line: what trains, and the memory its weights, gradients and AdamW moments take (activations
    come on top; they grow with micro_batch_size x seq_len)."""
    params = list(model.parameters())  # a tied matrix once
    trainable = [p for p in params if p.requires_grad]
    n_all, n_trained = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    # Per trainable number: its gradient and AdamW's two moments, each the size of the weight.
    training_bytes = 3 * sum(p.numel() * p.element_size() for p in trainable)
    return (f"{describe(settings)}: {n_trained:,} trainable of {n_all:,} parameters "
            f"({100 * n_trained / max(n_all, 1):.2g}%); memory: weights {weight_bytes / 1e6:,.0f} MB, "
            f"gradients + AdamW moments {training_bytes / 1e6:,.0f} MB (activations on top)")


# ---------------------------------------------------------------------------------------------
# PEFT's format: adapter_config.json + adapter_model.safetensors (convert.py to-peft / from-peft)
# ---------------------------------------------------------------------------------------------


def save_peft(adapters: dict, settings: dict, folder: str) -> None:
    """Write our adapters (names as in our state dict) as a PEFT LoRA adapter folder."""
    from safetensors.torch import save_file

    from convert import to_hf_name

    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings["rank"],
        "lora_alpha": int(settings["alpha"]) if float(settings["alpha"]).is_integer() else settings["alpha"],
        "lora_dropout": settings["dropout"], "target_modules": list(settings["targets"]), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": None,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tensors = {PEFT_PREFIX + to_hf_name(k): v.detach().to(torch.float32).contiguous() for k, v in adapters.items()}
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_peft(folder: str) -> tuple[dict, dict]:
    """(adapters in our names, settings) from a PEFT LoRA adapter folder; what we cannot compute is refused."""
    from safetensors.torch import load_file

    from convert import from_hf_name

    config_path, weights_path = (os.path.join(folder, n) for n in ("adapter_config.json", "adapter_model.safetensors"))
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise UsageError(f"{path} not found: --adapter must be a PEFT adapter folder (adapter_config.json + "
                             "adapter_model.safetensors, as peft's save_pretrained writes)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    unsupported = [f"{key}={config.get(key)!r}" for key, plain in (
        ("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("use_rslora", False),
        ("fan_in_fan_out", False), ("modules_to_save", None), ("layers_to_transform", None))
        if config.get(key, plain) != plain]
    unsupported += [f"{key}={config[key]}" for key in ("rank_pattern", "alpha_pattern") if config.get(key)]
    if not isinstance(config.get("target_modules"), list):
        unsupported.append(f"target_modules={config.get('target_modules')!r} (a list of projection names is needed)")
    if unsupported:
        raise UsageError(f"{folder}: this adapter uses {', '.join(unsupported)}, which lora.py does not compute: "
                         "only plain LoRA on the attention and MLP projections loads")
    adapters = {}
    for name, tensor in load_file(weights_path).items():
        ours = from_hf_name(name.removeprefix(PEFT_PREFIX)) if name.startswith(PEFT_PREFIX) else None
        if ours is None or ".lora_" not in ours:
            raise UsageError(f"{folder}: unexpected tensor {name} in adapter_model.safetensors: only LoRA weights of "
                             "a Llama model's projections load")
        adapters[ours] = tensor
    settings = {"rank": config["r"], "alpha": float(config["lora_alpha"]), "dropout": float(config.get("lora_dropout", 0.0)),
                "targets": sorted(config["target_modules"])}
    return adapters, settings


def to_peft(args) -> int:
    """convert.py to-peft: a LoRA run's checkpoint -> a PEFT adapter folder."""
    from checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.ckpt, merge_lora=False)
    settings = ckpt["meta"].get("lora")
    if not settings:
        raise UsageError(f"{args.ckpt} is not a LoRA checkpoint (no meta['lora']): fine-tune with a finetune.lora "
                         "section, or export the whole model with to-hf")
    from convert import prepare_out_dir

    prepare_out_dir(args.out, args.overwrite)
    adapters = adapter_tensors(ckpt["state_dict"])
    save_peft(adapters, settings, args.out)
    size = sum(t.numel() * 4 for t in adapters.values())
    print(f"wrote {args.out}: PEFT LoRA adapter, {describe(settings)}, {len(adapters)} tensors "
          f"({size / 1e6:.1f} MB); load it with peft.PeftModel.from_pretrained(model, {args.out!r}) on the "
          "base exported by `convert.py to-hf`")
    return 0


def from_peft(args) -> int:
    """convert.py from-peft: our base checkpoint + a PEFT adapter folder -> a LoRA checkpoint every script runs."""
    from checkpoint import check_weights, load_checkpoint, model_config_of, save_checkpoint

    if not args.out.endswith(".ckpt"):
        raise UsageError(f"--out {args.out} must end in .ckpt")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: pick a new name or pass --overwrite")
    base = load_checkpoint(args.base)
    adapters, settings = load_peft(args.adapter)
    config = model_config_of(base["meta"], args.base)
    check_weights(base["state_dict"], config, args.base)
    rank, wanted = settings["rank"], {}  # the adapters this base takes: A (rank x in), B (out x rank) per target
    for key, weight in base["state_dict"].items():
        module = key.removesuffix(".weight")
        if key.startswith("blocks.") and module.rsplit(".", 1)[-1] in settings["targets"]:
            wanted[module + ".lora_A.weight"] = (rank, weight.shape[1])
            wanted[module + ".lora_B.weight"] = (weight.shape[0], rank)
    wrong = [k for k in wanted if k not in adapters or tuple(adapters[k].shape) != wanted[k]] + \
            [k for k in adapters if k not in wanted]
    if wrong:
        raise UsageError(f"{args.adapter} does not fit {args.base} ({len(wrong)} adapter tensors missing, extra or "
                         f"misshapen, e.g. {wrong[0]}): use the adapter trained on this base")
    meta = {**base["meta"], "lora": settings, "adapter_from": os.path.abspath(args.adapter)}
    meta.pop("train_state", None)  # a model to use, not a run to resume
    carried = {"tokenizer": base["tokenizer"]} if "tokenizer" in base else {}
    save_checkpoint({"state_dict": {**base["state_dict"], **adapters}, "meta": meta, **carried}, args.out)
    print(f"wrote {args.out}: {args.base} + {describe(settings)} from {args.adapter}; every script merges the "
          "adapters when it loads it")
    return 0
