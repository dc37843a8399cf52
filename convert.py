"""Convert checkpoints to and from the Hugging Face Llama format.

Our Transformer IS a Llama network (RoPE in Hugging Face's "split halves" pairing, RMSNorm,
SwiGLU, grouped-query attention, no biases), so converting only renames the weights; no tensor
is transposed or permuted. A sliding-window model becomes a Mistral one (same window rule).

Examples (from the repository root):

    # ours -> Hugging Face: a folder that AutoModelForCausalLM / AutoTokenizer load offline
    python convert.py to-hf --ckpt checkpoints/final.ckpt --out hf_model
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf_model')('The cat')[0])"

    # Hugging Face -> ours: a local Llama-architecture folder (config.json, *.safetensors or
    # pytorch_model.bin, tokenizer files) becomes a checkpoint for infer.py, eval_val.py,
    # evaluate_checkpoints.py and finetune.py (finetune.base_checkpoint)
    python convert.py from-hf --model ~/models/SmolLM2-135M --out checkpoints_hf/base.ckpt
    python infer.py --ckpt checkpoints_hf/base.ckpt --prompt "The capital of France is" --temperature 0

See docs/CONVERT.md for the whole import -> evaluate -> fine-tune -> chat walk-through.
This script imports torch and safetensors; `transformers` only for to-hf's config and tokenizer files.
"""

import argparse
import json
import os
import shutil

import torch

from checkpoint import check_weights, load_checkpoint, save_checkpoint
from config import UsageError, config_from_dict, run_cli
from data import load_tokenizer, tokenizer_for_checkpoint
from model import ModelConfig

# ---------------------------------------------------------------------------------------------
# Parameter names: ours <-> Hugging Face Llama/Mistral (the tensors themselves need no change)
# ---------------------------------------------------------------------------------------------

_TOP_LEVEL = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_IN_BLOCK = {"attn_norm": "input_layernorm", "attn": "self_attn", "mlp_norm": "post_attention_layernorm", "mlp": "mlp"}


def to_hf_name(name: str) -> str:
    """blocks.3.attn.q_proj.weight -> model.layers.3.self_attn.q_proj.weight, embed.weight -> model.embed_tokens.weight."""
    parts = name.split(".")
    if parts[0] == "blocks":  # blocks.<i>.<submodule>.<rest...>
        return ".".join(["model.layers", parts[1], _IN_BLOCK[parts[2]], *parts[3:]])
    return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])


def from_hf_name(hf_name: str) -> str | None:
    """The inverse of to_hf_name; None for a name that is not one of ours."""
    for ours, theirs in _TOP_LEVEL.items():
        if hf_name.startswith(theirs + "."):
            return ours + hf_name[len(theirs):]
    parts = hf_name.split(".")
    block_parts = {v: k for k, v in _IN_BLOCK.items()}
    if parts[:2] == ["model", "layers"] and len(parts) > 4 and parts[3] in block_parts:
        return ".".join(["blocks", parts[2], block_parts[parts[3]], *parts[4:]])
    return None


def to_hf_state_dict(our_state_dict: dict) -> dict:
    """Rename our parameters to Hugging Face Llama/Mistral names; the tensors need no change.

    No transpose (both use nn.Linear's (out, in) layout) and no q/k permutation (both use the
    "split halves" RoPE pairing). With tied embeddings both embed.weight and lm_head.weight
    appear, holding the same tensor, as in our state dict.
    """
    return {to_hf_name(name): tensor for name, tensor in our_state_dict.items()}


def hf_config_kwargs(c: ModelConfig) -> dict:
    """The LlamaConfig/MistralConfig arguments that describe the same network as our config."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, hidden_act="silu", attention_dropout=0.0,
    )


# ---------------------------------------------------------------------------------------------
# to-hf
# ---------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def prepare_out_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} is a file: give a folder name")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UsageError(f"--out {path} exists and is not empty: pick a new folder or pass --overwrite")
    os.makedirs(path, exist_ok=True)


def write_tokenizer(tokenizer, out: str) -> dict:
    """Tokenizer files AutoTokenizer.from_pretrained(out) reads offline; returns the special token ids.

    A tokenizer folder is copied as it is (its own tokenizer_config.json says how to use it).
    Otherwise (gpt2, a Hub name) the `tokenizers` backend is saved as tokenizer.json with a small
    tokenizer_config.json: the generic fast tokenizer class adds no special tokens, like data.py.
    """
    eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
    if os.path.isdir(tokenizer.spec):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer.spec, name)):
                shutil.copy(os.path.join(tokenizer.spec, name), os.path.join(out, name))
        bos = _special_token(tokenizer.spec, "bos_token")
    else:
        tokenizer.backend.save(os.path.join(out, "tokenizer.json"))
        bos = eos  # GPT-2's convention: <|endoftext|> both ends and starts a document
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
                    "unk_token": eos, "pad_token": eos, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
        with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
    bos_id = tokenizer.backend.token_to_id(bos) if bos else None
    return {"bos_token_id": bos_id, "eos_token_id": tokenizer.eos_id}


def _special_token(folder: str, key: str) -> str | None:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        token = json.load(f).get(key)
    return token.get("content") if isinstance(token, dict) else token


def hf_config(c: ModelConfig, special_ids: dict):
    """LlamaConfig, or MistralConfig for a sliding-window model.

    Mistral's sliding_window = w lets query i see keys i - w < j <= i, exactly our swa_window = w
    (proven by tests/test_model.py::test_sliding_window_matches_hf_mistral), so the value is copied.
    """
    import transformers  # slow import: only to-hf needs it

    kwargs = dict(hf_config_kwargs(c), **special_ids, pad_token_id=special_ids["eos_token_id"], dtype="float32")
    if c.swa_window:
        return transformers.MistralConfig(sliding_window=c.swa_window, architectures=["MistralForCausalLM"], **kwargs)
    return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"], **kwargs)


def to_hf(args) -> int:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt["meta"]
    config = ModelConfig(**meta["model_config"])
    tokenizer = tokenizer_for_checkpoint(meta, args.tokenizer)
    prepare_out_dir(args.out, args.overwrite)

    weights = {}
    for name, tensor in ckpt["state_dict"].items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: stored once, as the embedding (tie_word_embeddings: true)
        weights[to_hf_name(name)] = tensor.detach().to(torch.float32).contiguous()
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    special_ids = write_tokenizer(tokenizer, args.out)
    hf = hf_config(config, special_ids)
    hf.save_pretrained(args.out)
    _add_legacy_rope_theta(os.path.join(args.out, "config.json"), config.rope_theta)
    # Embedding rows past the tokenizer's vocabulary (padding to a multiple of 64) are no text:
    # never generate them, as infer.py does.
    padded_rows = list(range(tokenizer.vocab_size, config.vocab_size))
    GenerationConfig(**special_ids, pad_token_id=special_ids["eos_token_id"],
                     suppress_tokens=padded_rows or None).save_pretrained(args.out)
    print(f"wrote {args.out}: {type(hf).__name__} ({meta.get('kind')} checkpoint, step {meta.get('step')}, "
          f"{len(weights)} tensors), tokenizer {tokenizer.spec}")
    return 0


def _add_legacy_rope_theta(path: str, theta: float) -> None:
    """transformers 4.x and llama.cpp's converter read a top-level rope_theta; transformers 5 reads rope_parameters."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["rope_theta"] = theta
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# from-hf
# ---------------------------------------------------------------------------------------------


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{folder} has no config.json: pass a local Hugging Face model folder (--model DIR)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_config_from_hf(hf: dict, max_seq_len: int | None) -> ModelConfig:
    """Our ModelConfig for a Llama/Mistral config.json; anything our model cannot compute is refused by name."""
    kind = hf.get("model_type")
    archs = hf.get("architectures") or []
    if kind not in ("llama", "mistral") or any(a not in ("LlamaForCausalLM", "MistralForCausalLM") for a in archs):
        raise UsageError(f"model_type {kind!r} / architectures {archs} is not supported: only Llama and Mistral "
                         "causal LMs (LlamaForCausalLM, MistralForCausalLM) can be imported")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            unsupported.append(f"{key}=true (our layers have no biases)")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope scaling {hf.get('rope_scaling') or rope} (only plain RoPE)")
    if hf.get("quantization_config"):
        unsupported.append("quantization_config (import an unquantized model)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads) or hf["hidden_size"] % heads:
        unsupported.append(f"head_dim={hf.get('head_dim')} != hidden_size / num_attention_heads")
    if unsupported:
        raise UsageError(f"cannot import this {kind} model, unsupported: {'; '.join(unsupported)}")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
            n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            swa_window=(hf.get("sliding_window") or 0) if kind == "mistral" else 0,
        )
    except (KeyError, ValueError) as e:
        raise UsageError(f"config.json does not describe a model we can build: {e}") from None


def weight_files(folder: str) -> list[str]:
    """The files holding the model: a sharded index's shards, else model.safetensors, else pytorch_model.bin."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise UsageError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index of them)")


def read_hf_weights(folder: str) -> dict:
    """Every tensor of a local model folder; .bin files are read with weights_only (loading never runs code)."""
    from safetensors.torch import load_file

    weights = {}
    for path in weight_files(folder):
        if not os.path.isfile(path):
            raise UsageError(f"{path} is missing: the download is incomplete")
        if path.endswith(".safetensors"):
            weights.update(load_file(path))
        else:
            weights.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return weights


def from_hf_state_dict(hf_weights: dict, config: ModelConfig) -> dict:
    """Hugging Face names -> ours (fp32). Unknown tensors are refused by name; tied heads share the embedding."""
    ours, unknown = {}, []
    for hf_name, tensor in hf_weights.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # older transformers saved RoPE's frequencies; we compute them
        name = from_hf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
        else:
            ours[name] = tensor.to(torch.float32)
    if unknown:
        raise UsageError(f"unsupported weights in the model files: {', '.join(unknown[:3])}"
                         + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]  # one matrix, as in our model's state dict
    return ours


def run_config(config: ModelConfig, tokenizer_spec: str) -> dict:
    """A full config dict, as train.py stores: the model section from config.json, defaults elsewhere."""
    model = {k: v for k, v in vars(config).items() if k != "gradient_checkpointing"}
    raw = {"model": model, "training": {"seq_len": min(config.max_seq_len, 256)},
           "data": {"tokenizer_name": tokenizer_spec}}
    return config_from_dict(raw).to_dict()


def from_hf(args) -> int:
    folder = os.path.expanduser(args.model)
    if not os.path.isdir(folder):
        raise UsageError(f"--model {args.model} is not a folder: download the model first (see docs/CONVERT.md)")
    if not args.out.endswith(".ckpt"):
        raise UsageError(f"--out {args.out} must end in .ckpt")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: pick a new name or pass --overwrite")
    config = model_config_from_hf(read_hf_config(folder), args.max_seq_len)
    tokenizer = load_tokenizer(args.tokenizer or folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}: pass the model's own tokenizer")
    state_dict = from_hf_state_dict(read_hf_weights(folder), config)
    check_weights(state_dict, config, folder)
    n_params = sum(t.numel() for k, t in state_dict.items() if not (k == "lm_head.weight" and config.tie_embeddings))
    meta = {"kind": "pretrain", "step": 0, "epoch": None, "tokens_seen": 0, "supervised_seen": 0,
            "train_loss": None, "val_loss": None, "n_params": n_params, "model_config": vars(config).copy(),
            "config": run_config(config, tokenizer.spec), "tokenizer": tokenizer.spec,
            "imported_from": os.path.abspath(folder)}
    save_checkpoint({"state_dict": state_dict, "meta": meta}, args.out)
    swa = f", sliding window {config.swa_window}" if config.swa_window else ""
    print(f"wrote {args.out}: {n_params:,} parameters, {config.n_layers} layers, d_model {config.d_model}, "
          f"{config.n_heads} heads / {config.n_kv_heads} K/V heads, context {config.max_seq_len}{swa}, "
          f"tokenizer {tokenizer.spec}")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    out = sub.add_parser("to-hf", help="our .ckpt -> a Hugging Face model folder",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    out.add_argument("--ckpt", required=True, help="checkpoint written by train.py or finetune.py")
    out.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer files)")
    out.add_argument("--tokenizer", default="auto", help="auto = the one recorded in the checkpoint; or gpt2, a folder")
    out.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    inp = sub.add_parser("from-hf", help="a local Hugging Face Llama/Mistral folder -> our .ckpt",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inp.add_argument("--model", required=True, help="local folder with config.json and the weights")
    inp.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    inp.add_argument("--tokenizer", default=None, help="default: the tokenizer files in --model")
    inp.add_argument("--max-seq-len", "--max_seq_len", type=int, default=None,
                     help="context length (KV cache size); default: config.json's max_position_embeddings")
    inp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return to_hf(args) if args.command == "to-hf" else from_hf(args)


if __name__ == "__main__":
    run_cli(main)
