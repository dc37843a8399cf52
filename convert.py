"""Convert checkpoints to and from the Hugging Face Llama format, and to GGUF for llama.cpp.

Our Transformer IS a Llama network (RoPE in Hugging Face's "split halves" pairing, RMSNorm,
SwiGLU, grouped-query attention, no biases), so converting to Hugging Face only renames the
weights; no tensor is transposed or permuted. A sliding-window model becomes a Mistral one (same
window rule). GGUF (llama.cpp's file) also needs q and k permuted into GGML's RoPE pairing.
A checkpoint exports with its chat template (chat.chat_template_for): ours for a model fine-tuned here.

Examples (from the repository root):

    # ours -> Hugging Face: a folder that AutoModelForCausalLM / AutoTokenizer load offline
    python convert.py to-hf --ckpt checkpoints/final.ckpt --out hf_model
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf_model')('The cat')[0])"

    # ours -> one GGUF file for llama.cpp and Ollama (f32, f16, bf16 or q8_0; see docs/CONVERT.md)
    python convert.py to-gguf --ckpt checkpoints/sft/final.ckpt --out model.gguf --dtype q8_0

    # Hugging Face -> ours: a local Llama-architecture folder (config.json, *.safetensors or
    # pytorch_model.bin, tokenizer files) becomes a checkpoint for infer.py, eval_val.py,
    # evaluate_checkpoints.py and finetune.py (finetune.base_checkpoint)
    python convert.py from-hf --model ~/models/SmolLM2-135M --out checkpoints_hf/base.ckpt
    python infer.py --ckpt checkpoints_hf/base.ckpt --prompt "The capital of France is" --temperature 0

    # a LoRA run's adapters <-> PEFT's adapter folder (adapter_config.json + adapter_model.safetensors; lora.py)
    python convert.py to-peft --ckpt checkpoints/sft_lora/final.ckpt --out adapter
    python convert.py from-peft --base checkpoints/final.ckpt --adapter adapter --out checkpoints/lora.ckpt

See docs/CONVERT.md for the whole import -> evaluate -> fine-tune -> chat walk-through.
This script imports torch and safetensors; `transformers` only for to-hf's config files, `gguf`
only for to-gguf.
"""

import argparse
import dataclasses
import json
import os

import torch

import lora
from chat import chat_template_for, imported_chat_template
from checkpoint import atomic_write, check_weights, fit_vocab_rows, load_checkpoint, model_config_of, save_checkpoint
from cli import UsageError, check_output_file, read_text, run_cli
from config import config_from_dict
from model import ModelConfig
from tokenizer import load_tokenizer, save_tokenizer, tokenizer_for_checkpoint

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


def to_hf_state_dict(our_state_dict: dict, config: ModelConfig) -> dict:
    """Rename our parameters to Hugging Face Llama/Mistral names; only the vocabulary's padding goes.

    No transpose (both use nn.Linear's (out, in) layout) and no q/k permutation (both use the
    "split halves" RoPE pairing). The embedding and head keep their first vocab_size rows: Hugging
    Face's model has one row per token (ours pads them, see ModelConfig.padded_vocab_size). With tied
    embeddings both embed.weight and lm_head.weight appear, holding the same tensor, as in our state dict.
    """
    def rows_in_use(name, tensor):
        return tensor[:config.vocab_size] if name in ("embed.weight", "lm_head.weight") else tensor

    return {to_hf_name(name): rows_in_use(name, tensor) for name, tensor in our_state_dict.items()}


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

def prepare_out_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} is a file: give a folder name")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UsageError(f"--out {path} exists and is not empty: pick a new folder or pass --overwrite")
    os.makedirs(path, exist_ok=True)


def special_tokens(tokenizer) -> tuple[str | None, str]:
    """(BOS, EOS) as text: the tokenizer's own (gpt2: <|endoftext|> both ends and starts a document)."""
    bos = tokenizer.backend.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    return bos, tokenizer.backend.id_to_token(tokenizer.eos_id)


def write_tokenizer(tokenizer, out: str, max_seq_len: int, chat_template) -> dict:
    """Tokenizer files AutoTokenizer.from_pretrained(out) reads offline; returns the special token ids.

    The tokenizer the checkpoint carries (exactly the one it was trained with) is saved as tokenizer.json,
    with a tokenizer_config.json for the generic fast tokenizer class, which adds no special tokens, like
    tokenizer.py. It also says which inputs the model takes (transformers 4.x would otherwise hand
    `token_type_ids` to generate, which fails), its context length, and the chat template.
    """
    bos, eos = special_tokens(tokenizer)
    save_tokenizer(out, tokenizer.backend, eos_token=eos, bos_token=bos, pad_token=eos, unk_token=eos,
                   chat_template=chat_template, model_input_names=["input_ids", "attention_mask"],
                   model_max_length=max_seq_len)
    bos_id = tokenizer.backend.token_to_id(bos) if bos else None
    return {"bos_token_id": bos_id, "eos_token_id": tokenizer.eos_id}


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


def exportable_config(meta: dict, path: str, target: str) -> ModelConfig:
    """The checkpoint's ModelConfig, refused in one line when it departs from the Llama recipe (model.mlp,
    qk_norm, logit_softcap): `target` could load such weights but would compute a different network."""
    config = model_config_of(meta, path)
    if not config.llama_compatible:
        used = [f"model.{k}={v}" for k, v in (("mlp", config.mlp), ("qk_norm", config.qk_norm),
                                               ("logit_softcap", config.logit_softcap))
                if v != getattr(ModelConfig, k)]
        raise UsageError(f"{path} uses {', '.join(used)}, which {target} does not compute: exporting it would give "
                         "a different model; only models on the Llama recipe export")
    return config


def to_hf(args) -> int:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt["meta"]
    config = exportable_config(meta, args.ckpt, "Hugging Face's Llama")
    check_weights(ckpt["state_dict"], config, args.ckpt)
    tokenizer = tokenizer_for_checkpoint(ckpt, args.tokenizer, force=args.force_tokenizer)
    prepare_out_dir(args.out, args.overwrite)

    weights = to_hf_state_dict(ckpt["state_dict"], config)
    if config.tie_embeddings:
        del weights["lm_head.weight"]  # tied: stored once, as the embedding (tie_word_embeddings: true)
    weights = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in weights.items()}
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    template = chat_template_for(meta)
    special_ids = write_tokenizer(tokenizer, args.out, config.max_seq_len, template)
    hf = hf_config(config, special_ids)
    hf.save_pretrained(args.out)
    _add_legacy_rope_theta(os.path.join(args.out, "config.json"), config.rope_theta)
    # max_length: a plain generate/pipeline call stops at the context.
    GenerationConfig(**special_ids, pad_token_id=special_ids["eos_token_id"],
                     max_length=config.max_seq_len).save_pretrained(args.out)
    print(f"wrote {args.out}: {type(hf).__name__} ({meta.get('kind')} checkpoint, step {meta.get('step')}, "
          f"{len(weights)} tensors), tokenizer {tokenizer.spec}" + (", chat template" if template else ""))
    return 0


def _add_legacy_rope_theta(path: str, theta: float) -> None:
    """transformers 4.x and llama.cpp's converter read a top-level rope_theta; transformers 5 reads rope_parameters."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["rope_theta"] = theta
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# to-gguf: one file for llama.cpp and Ollama
# ---------------------------------------------------------------------------------------------


def gguf_tensor_names(n_layers: int) -> dict:
    """Our parameter names -> llama.cpp's (from the gguf package): blocks.3.attn.q_proj.weight -> blk.3.attn_q.weight."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES

    top = {"embed": T.TOKEN_EMBD, "norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}
    block = {"attn_norm": T.ATTN_NORM, "attn.q_proj": T.ATTN_Q, "attn.k_proj": T.ATTN_K, "attn.v_proj": T.ATTN_V,
             "attn.o_proj": T.ATTN_OUT, "mlp_norm": T.FFN_NORM, "mlp.gate_proj": T.FFN_GATE,
             "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN}
    names = {f"{ours}.weight": f"{TENSOR_NAMES[t]}.weight" for ours, t in top.items()}
    for i in range(n_layers):
        names.update({f"blocks.{i}.{ours}.weight": f"{TENSOR_NAMES[t].format(bid=i)}.weight" for ours, t in block.items()})
    return names


def to_ggml_rope_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection from our RoPE pairing to GGML's.

    RoPE turns pairs of each head's dimensions by position * theta^(-2i/head_dim), i < head_dim/2.
    We (and Hugging Face) pair dimension i with i + head_dim/2; llama.cpp's Llama pairs 2i with 2i+1.
    So row i of each head moves to 2i and row i + head_dim/2 to 2i+1: the same pairs, turned by the
    same angles. q and k are permuted alike, so every attention score q.k stays what it was.
    weight: (n_heads * head_dim, d_model)
    """
    head_dim = weight.shape[0] // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, -1)  # [h, j, i] = row h*head_dim + j*head_dim/2 + i
    return halves.transpose(1, 2).reshape(weight.shape)  # row h*head_dim + 2i + j


def gguf_vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens by id, their types, the merges.

    Only byte-level BPE with GPT-2's pre-tokenizer has that exact meaning in llama.cpp (gpt2, and
    train_tokenizer.py folders); any other tokenizer would split text differently there, so it is refused.
    """
    from gguf import TokenType

    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if (model["type"] != "BPE" or spec.get("normalizer") or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space") or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")):
        raise UsageError(f"to-gguf writes byte-level BPE tokenizers with GPT-2's pre-tokenizer (gpt2, train_tokenizer.py "
                         f"folders), but {tokenizer.spec} is a {model['type']} tokenizer with pre-tokenizer "
                         f"{pre.get('type')}: use to-hf, then llama.cpp's convert_hf_to_gguf.py on that folder")
    added = tokenizer.backend.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.backend.id_to_token(i)
        tokens.append(token if token is not None else f"[UNUSED{i}]")
        types.append(TokenType.UNUSED if token is None else TokenType.CONTROL if i in added and added[i].special
                     else TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # "a b" or ["a", "b"]
    return tokens, types, merges


GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
# How GPT-2's byte-level BPE cuts text into words before merging (the `tokenizers` ByteLevel pre-tokenizer's rule).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def to_gguf(args) -> int:
    try:
        import gguf
    except ImportError:
        raise UsageError("to-gguf needs the gguf package: pip install -r requirements.txt") from None
    check_output_file(args.out, "--out")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: pick a new name or pass --overwrite")
    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt["meta"]
    config = exportable_config(meta, args.ckpt, "llama.cpp's Llama architecture")
    check_weights(ckpt["state_dict"], config, args.ckpt)
    if config.swa_window:
        raise UsageError(f"this model uses sliding-window attention (swa_window {config.swa_window}), which llama.cpp's "
                         "Llama architecture would replace by full attention (other tokens): export it with to-hf instead")
    tokenizer = tokenizer_for_checkpoint(ckpt, args.tokenizer, force=args.force_tokenizer)
    tokens, token_types, merges = gguf_vocab(tokenizer)
    bos, _ = special_tokens(tokenizer)
    template = chat_template_for(meta)

    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(os.path.splitext(os.path.basename(args.out))[0])
    writer.add_file_type(file_types[args.dtype])
    if args.dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # ... split into words by GPT-2's regular expression
    writer.add_string("tokenizer.ggml.pretokenizer", GPT2_SPLIT)  # the same for Ollama's engine (default: Llama 3's)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_id)
    if bos:
        writer.add_bos_token_id(tokenizer.backend.token_to_id(bos))
    writer.add_add_bos_token(False)  # like tokenizer.py: text is encoded as it is
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(template)

    names, kept_f16 = gguf_tensor_names(config.n_layers), []
    for name, tensor in ckpt["state_dict"].items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: llama.cpp uses token_embd as the output head when there is no output.weight
        weight = tensor.detach().to(torch.float32)
        if name in ("embed.weight", "lm_head.weight"):
            # llama.cpp wants one row per token: the vocab_size rows of the tokenizer, never our padding rows
            # (fewer only for a file that stores no tokenizer, whose vocab_size is its row count)
            weight = weight[:len(tokens)]
        if name.endswith("q_proj.weight"):
            weight = to_ggml_rope_layout(weight, config.n_heads)
        elif name.endswith("k_proj.weight"):
            weight = to_ggml_rope_layout(weight, config.n_kv_heads)
        qtype = qtypes[args.dtype] if weight.dim() > 1 else gguf.GGMLQuantizationType.F32  # norms stay f32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # q8_0 cuts rows into blocks of 32; else f16, as llama.cpp does
            kept_f16.append(names[name])
        writer.add_tensor(names[name], gguf.quants.quantize(weight.numpy(), qtype), raw_dtype=qtype)

    def write(f):  # GGUFWriter opens the file by name: the temporary one that atomic_write then renames
        writer.write_header_to_file(path=f.name)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(args.out, write)
    n_tensors = len(names) - (1 if config.tie_embeddings else 0)
    print(f"wrote {args.out}: llama, {args.dtype}, {n_tensors} tensors, {len(tokens)} tokens "
          f"({meta.get('kind')} checkpoint, step {meta.get('step')})" + (", chat template" if template else "")
          + (f"; kept in f16 (rows not a multiple of 32): {', '.join(kept_f16)}" if kept_f16 else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# from-hf
# ---------------------------------------------------------------------------------------------


def read_json(path: str, what: str) -> dict:
    """A JSON object from a model folder; anything else (not JSON, not an object, not UTF-8) is one line."""
    try:
        value = json.loads(read_text(path))
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e}): download the model's {what} again") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} must hold a JSON object, not {type(value).__name__}: download the model's {what} again")
    return value


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{folder} has no config.json: pass a local Hugging Face model folder (--model DIR)")
    return read_json(path, "config.json")


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
    for key in ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] <= 0:
            raise UsageError(f"config.json: {key} must be a positive integer, got {hf.get(key)!r}: this is not a "
                             "complete Llama/Mistral config")
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
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"config.json does not describe a model we can build: {e}") from None


def weight_files(folder: str) -> list[str]:
    """The files holding the model: a sharded index's shards, else model.safetensors, else pytorch_model.bin."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            weight_map = read_json(path, index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UsageError(f"{path} has no weight_map (parameter name -> file): download the index again")
            return sorted({os.path.join(folder, name) for name in weight_map.values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise UsageError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index of them)")


def read_hf_weights(folder: str) -> dict:
    """Every tensor of a local model folder; .bin files are read with weights_only (loading never runs code)."""
    import pickle

    from safetensors.torch import load_file

    weights = {}
    for path in weight_files(folder):
        if not os.path.isfile(path):
            raise UsageError(f"{path} is missing: the download is incomplete")
        try:
            if path.endswith(".safetensors"):
                weights.update(load_file(path))
            else:
                weights.update(read_bin(path))
        except pickle.UnpicklingError:
            raise UsageError(f"{path} holds Python objects beyond tensors; refusing to load it because unpickling "
                             "could run code: use the model's .safetensors files instead") from None
        except Exception as e:  # safetensors raises its own SafetensorError; torch RuntimeError, EOFError, ...
            raise UsageError(f"{path} is not a readable weights file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:100]}): the download is incomplete or damaged") from None
    return weights


def read_bin(path: str) -> dict:
    """A pytorch_model.bin, tensors only (weights_only: loading never runs code). Files in torch's legacy
    (pre-zip) format cannot be memory-mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "zip" not in str(e) and "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def from_hf_state_dict(hf_weights: dict, config: ModelConfig) -> dict:
    """Hugging Face names -> ours (fp32). Unknown tensors are refused by name; tied heads share the embedding."""
    ours, unknown = {}, []
    for hf_name, tensor in hf_weights.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # older transformers saved RoPE's frequencies; we compute them
        name = from_hf_name(str(hf_name))
        if name is None or not isinstance(tensor, torch.Tensor):
            unknown.append(str(hf_name))
        else:
            ours[name] = tensor.to(torch.float32)
    if unknown:
        raise UsageError(f"unsupported weights in the model files: {', '.join(unknown[:3])}"
                         + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    if config.tie_embeddings and "embed.weight" in ours:
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
    # Ours: vocab_size is the tokenizer's (rows past it are no text), the rows padded (ModelConfig.padded_vocab_size).
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    state_dict = fit_vocab_rows(from_hf_state_dict(read_hf_weights(folder), config), config)
    check_weights(state_dict, config, folder)
    n_params = sum(t.numel() for k, t in state_dict.items() if not (k == "lm_head.weight" and config.tie_embeddings))
    meta = {"kind": "pretrain", "step": 0, "epoch": None, "tokens_seen": 0, "supervised_seen": 0,
            "train_loss": None, "val_loss": None, "n_params": n_params, "model_config": vars(config).copy(),
            "config": run_config(config, tokenizer.spec), "tokenizer": tokenizer.spec,
            "tokenizer_sha256": tokenizer.sha256, "imported_from": os.path.abspath(folder)}
    template = imported_chat_template(tokenizer.spec) if os.path.isdir(tokenizer.spec) else None
    if template:
        meta["chat_template"] = template  # chat.py prompts with it; to-hf / to-gguf export it again
    save_checkpoint({"state_dict": state_dict, "tokenizer": tokenizer.to_dict(), "meta": meta}, args.out)
    swa = f", sliding window {config.swa_window}" if config.swa_window else ""
    print(f"wrote {args.out}: {n_params:,} parameters, {config.n_layers} layers, d_model {config.d_model}, "
          f"{config.n_heads} heads / {config.n_kv_heads} K/V heads, context {config.max_seq_len}{swa}, "
          f"tokenizer {tokenizer.spec}" + (", chat template" if template else ""))
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
    out.add_argument("--tokenizer", default="auto", help="auto = the copy the checkpoint carries; or gpt2, a folder")
    out.add_argument("--force-tokenizer", "--force_tokenizer", action="store_true",
                     help="use --tokenizer even though it is not the one the checkpoint was trained with")
    out.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    gg = sub.add_parser("to-gguf", help="our .ckpt -> a GGUF file for llama.cpp and Ollama",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gg.add_argument("--ckpt", required=True, help="checkpoint written by train.py, finetune.py or from-hf")
    gg.add_argument("--out", required=True, help="file to write (model.gguf)")
    gg.add_argument("--dtype", default="f32", choices=GGUF_DTYPES,
                    help="weight type of the matrices (norms stay f32); q8_0: 8-bit blocks of 32, about 1/4 of f32")
    gg.add_argument("--tokenizer", default="auto", help="auto = the copy the checkpoint carries; or gpt2, a folder")
    gg.add_argument("--force-tokenizer", "--force_tokenizer", action="store_true",
                    help="use --tokenizer even though it is not the one the checkpoint was trained with")
    gg.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    inp = sub.add_parser("from-hf", help="a local Hugging Face Llama/Mistral folder -> our .ckpt",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inp.add_argument("--model", required=True, help="local folder with config.json and the weights")
    inp.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    inp.add_argument("--tokenizer", default=None, help="default: the tokenizer files in --model")
    inp.add_argument("--max-seq-len", "--max_seq_len", type=int, default=None,
                     help="context length (KV cache size); default: config.json's max_position_embeddings")
    inp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    peft_out = sub.add_parser("to-peft", help="a LoRA run's .ckpt -> a PEFT adapter folder (lora.py)")
    peft_out.add_argument("--ckpt", required=True, help="checkpoint of a finetune.py run with finetune.lora")
    peft_out.add_argument("--out", required=True, help="folder to write (adapter_config.json, adapter_model.safetensors)")
    peft_out.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    peft_in = sub.add_parser("from-peft", help="our base .ckpt + a PEFT LoRA adapter folder -> our .ckpt (lora.py)")
    peft_in.add_argument("--base", required=True, help="the checkpoint the adapter was trained on")
    peft_in.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    peft_in.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    peft_in.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return {"to-hf": to_hf, "to-gguf": to_gguf, "from-hf": from_hf, "to-peft": lora.to_peft,
            "from-peft": lora.from_peft}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
