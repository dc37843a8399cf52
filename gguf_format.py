"""GGUF, llama.cpp's one-file model format, as our model sees it: names, layouts, tokenizer, both ways.

    names = gguf_tensor_names(n_layers)              # blocks.0.attn.q_proj.weight -> blk.0.attn_q.weight
    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.config, model.state_dict, model.tokenizer, model.chat_template

convert.py's to-gguf writes with these pieces and its from-gguf reads with read_gguf. A GGUF file is
a header of metadata (key -> value: the architecture's hyperparameters under "llama.*", the tokenizer
under "tokenizer.ggml.*") followed by tensors, each stored as f32, f16, bf16 or in a quantized block
format that `gguf.quants.dequantize` turns back into floats. Three things differ from our checkpoint:
tensor names; the rows of q and k (llama.cpp pairs RoPE dimensions 2i, 2i+1, we pair i, i + head_dim/2);
and the tokenizer, which is a token list, merges and a *name* for how text is cut into words before
merging (tokenizer.ggml.pre) -- PRE_TOKENIZERS below says what each name means to `tokenizers`.
Only `gguf` (llama.cpp's own Python package) reads the file; `transformers` is never needed.
"""

import json
from dataclasses import dataclass

import torch

from cli import UsageError
from model import ModelConfig
from tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Tensors: names and the q/k row order
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


def from_ggml_rope_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of to_ggml_rope_layout: row 2i + j of each head goes back to j * head_dim/2 + i."""
    head_dim = weight.shape[0] // n_heads
    pairs = weight.reshape(n_heads, head_dim // 2, 2, -1)  # [h, i, j] = row h*head_dim + 2i + j
    return pairs.transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers: llama.cpp's names <-> `tokenizers` structures
# ---------------------------------------------------------------------------------------------

# How GPT-2's byte-level BPE cuts text into words before merging (the `tokenizers` ByteLevel pre-tokenizer's rule).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM's: each digit on its own, then GPT-2's rule (so no " 5": the space before a digit stays whole).
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
# Llama 3's (as its tokenizer.json writes it): numbers in runs of up to three digits, newlines kept apart.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}  # GPT-2's rule, then bytes
_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}  # bytes only: split before


@dataclass(frozen=True)
class PreTokenizer:
    structure: dict  # the `tokenizers` pre-tokenizer, as tokenizer.json writes it
    split: str  # the same cut as one regular expression: what Ollama's engine reads (tokenizer.ggml.pretokenizer)
    ignore_merges: bool = False  # a word that is one token is taken whole, without merging (Llama 3's BPE)


# tokenizer.ggml.pre -> what llama.cpp does with that name (llama-vocab.cpp), as a `tokenizers` pre-tokenizer.
# Read by from-gguf to rebuild a tokenizer, and by to-gguf to name one (the first name that fits is written).
PRE_TOKENIZERS = {
    "gpt-2": PreTokenizer(_BYTE_LEVEL, GPT2_SPLIT),
    "smollm": PreTokenizer({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                   _BYTE_LEVEL]}, SMOLLM_SPLIT),
    "llama-bpe": PreTokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}, _BYTES_ONLY]},
        LLAMA3_SPLIT, ignore_merges=True),
}
PRE_TOKENIZER_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "starcoder": "smollm"}  # same rule in llama.cpp


def _without_trim_offsets(structure):
    """A pre-tokenizer's JSON without trim_offsets (it moves reported offsets, never the ids)."""
    if isinstance(structure, dict):
        return {k: _without_trim_offsets(v) for k, v in structure.items() if k != "trim_offsets"}
    if isinstance(structure, list):
        return [_without_trim_offsets(v) for v in structure]
    return structure


def pre_tokenizer_name(structure: dict | None, ignore_merges: bool) -> str | None:
    """tokenizer.ggml.pre for a `tokenizers` pre-tokenizer (its tokenizer.json form), or None when llama.cpp has none."""
    found = _without_trim_offsets(structure)
    for name, pre in PRE_TOKENIZERS.items():
        if found == _without_trim_offsets(pre.structure) and ignore_merges == pre.ignore_merges:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Writing the tokenizer (to-gguf)
# ---------------------------------------------------------------------------------------------


def gguf_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str], str]:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens by id, their types, the merges,
    and the tokenizer.ggml.pre name of its pre-tokenizer.

    Only byte-level BPE whose pre-tokenizer is in PRE_TOKENIZERS has an exact meaning in llama.cpp; any other
    tokenizer would split text differently there, so it is refused.
    """
    from gguf import TokenType

    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer")
    pre_name = pre_tokenizer_name(pre, bool(model.get("ignore_merges")))
    if (model["type"] != "BPE" or spec.get("normalizer") or pre_name is None or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        kind = (pre or {}).get("type")
        if kind == "Sequence":
            kind += "[" + ", ".join(p.get("type", "?") for p in pre.get("pretokenizers", [])) + "]"
        raise UsageError(f"to-gguf writes byte-level BPE tokenizers whose pre-tokenizer llama.cpp names "
                         f"({', '.join(PRE_TOKENIZERS)}), but {tokenizer.spec} is a {model['type']} tokenizer with "
                         f"pre-tokenizer {kind}" + (" and a normalizer" if spec.get("normalizer") else "")
                         + ": use to-hf, then llama.cpp's convert_hf_to_gguf.py on that folder")
    added = tokenizer.backend.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.backend.id_to_token(i)
        tokens.append(token if token is not None else f"[UNUSED{i}]")
        types.append(TokenType.UNUSED if token is None else TokenType.CONTROL if i in added and added[i].special
                     else TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # "a b" or ["a", "b"]
    return tokens, types, merges, pre_name


# ---------------------------------------------------------------------------------------------
# Reading a file (from-gguf)
# ---------------------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    config: ModelConfig
    state_dict: dict  # our names, fp32, our q/k layout; lm_head.weight is embed.weight when tied
    tokenizer: Tokenizer
    chat_template: str | None
    eot_id: int | None  # tokenizer.ggml.eot_token_id: the end of a chat turn, where the file names one
    tensor_types: dict  # type name (Q4_1, F32, ...) -> how many tensors are stored in it


def open_gguf(path: str):
    """gguf.GGUFReader on `path`; a file that is no GGUF, or is cut short, is one line."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except ValueError as e:
        if "is not a valid GGMLQuantizationType" in str(e):
            raise UsageError(f"{path} stores a tensor in a type the installed gguf package does not know ({e}): "
                             "upgrade gguf (pip install -U gguf), or convert the model to a common type") from None
        if "magic" in str(e):
            raise UsageError(f"cannot read {path}: it is not a GGUF file: pass a .gguf file (llama.cpp's format)") from None
        detail = str(e)
    except Exception as e:  # numpy raises on a file cut short: the header promises bytes that are not there
        detail = f"{type(e).__name__}: {e}"
    reason = f"it is truncated or damaged ({detail.splitlines()[0][:80] if detail else 'no detail'})"
    raise UsageError(f"cannot read {path}: {reason}: download the .gguf again") from None


def metadata(reader) -> dict:
    """Every key of the header as plain Python (str, int, float, bool, lists), the GGUF.* bookkeeping left out."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def model_config_from_gguf(meta: dict, vocab_size: int, path: str) -> ModelConfig:
    """Our ModelConfig from a Llama GGUF's llama.* keys; anything our model cannot compute is refused by name.
    The context is the file's llama.context_length (convert.py may shorten it); the embeddings are tied
    until read_gguf finds an output.weight."""
    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise UsageError(f"{path} lacks llama.{name}: the file's header is incomplete, download it again")
        return value

    heads = key("attention.head_count")
    d_model = key("embedding_length")
    head_dim = d_model // heads
    unsupported = []
    if meta.get("llama.expert_count"):
        unsupported.append(f"mixture of experts (llama.expert_count {meta['llama.expert_count']})")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        unsupported.append(f"RoPE scaling ({meta.get('llama.rope.scaling.type')}, only plain RoPE)")
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{name}", head_dim) != head_dim:
            unsupported.append(f"llama.{name} {meta[f'llama.{name}']} != embedding_length / head_count ({head_dim})")
    if unsupported:
        raise UsageError(f"cannot import {path}, unsupported: {'; '.join(unsupported)}")
    context = key("context_length", 2048)
    try:
        return ModelConfig(
            vocab_size=vocab_size, n_layers=key("block_count"), d_model=d_model, n_heads=heads,
            n_kv_heads=key("attention.head_count_kv", heads), d_ff=key("feed_forward_length"),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=context, tie_embeddings=True)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path} does not describe a model we can build: {e}") from None


def read_tensors(reader, config: ModelConfig, path: str) -> dict:
    """Every tensor, dequantized to fp32 under our name and in our q/k layout; what cannot be read is one line."""
    import numpy as np
    from gguf.quants import dequantize

    ours = {theirs: name for name, theirs in gguf_tensor_names(config.n_layers).items()}
    state_dict, unknown = {}, []
    for t in reader.tensors:
        name = ours.get(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UsageError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize: use a file quantized to f32, f16, bf16, q8_0, q4_*, q5_* or a "
                             "k-quant") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy: F32 data is the mapped file
        if name.endswith("q_proj.weight"):
            weight = from_ggml_rope_layout(weight, config.n_heads)
        elif name.endswith("k_proj.weight"):
            weight = from_ggml_rope_layout(weight, config.n_kv_heads)
        state_dict[name] = weight.contiguous()
    if unknown:
        raise UsageError(f"{path} holds tensors a Llama model does not have: {', '.join(unknown[:3])}"
                         + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    return state_dict


def gguf_tokenizer(meta: dict, path: str) -> Tokenizer:
    """The tokenizer the header describes, rebuilt as a `tokenizers` backend (no transformers needed).

    "gpt2" (byte-level BPE): the token list and merges as a BPE model; tokens typed CONTROL become special
    added tokens (<|im_start|>: matched whole, never split), USER_DEFINED plain added ones; the pre-tokenizer
    is the one PRE_TOKENIZERS gives for tokenizer.ggml.pre, as llama.cpp would cut the text.
    """
    from gguf import TokenType
    from tokenizers import Tokenizer as Backend

    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise UsageError(f"{path} holds no tokenizer (no tokenizer.ggml.model / tokens): import a GGUF that "
                         "carries one, or the model's Hugging Face folder with from-hf")
    if model != "gpt2":
        what = "a SentencePiece vocabulary" if model == "llama" else f"tokenizer.ggml.model {model!r}"
        raise UsageError(f"{path} has {what}; from-gguf rebuilds byte-level BPE ('gpt2') tokenizers only: import "
                         "the model's Hugging Face folder (tokenizer.json) with from-hf instead")
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    pre = PRE_TOKENIZERS.get(PRE_TOKENIZER_ALIASES.get(pre_name, pre_name))
    if pre is None:
        raise UsageError(f"{path} names the pre-tokenizer {pre_name!r}, which from-gguf does not know (it knows "
                         f"{', '.join([*PRE_TOKENIZERS, *PRE_TOKENIZER_ALIASES])}): import the model's Hugging Face "
                         "folder with from-hf instead")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges") or []
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == TokenType.CONTROL}
             for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre.structure, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre.ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [m.split(" ", 1) for m in merges]}}
    try:
        backend = Backend.from_str(json.dumps(spec))
    except Exception as e:  # `tokenizers` raises a bare Exception for a vocabulary it cannot build
        raise UsageError(f"{path}: its tokenizer cannot be rebuilt ({str(e).splitlines()[0][:100]}): the "
                         "header is damaged, download the file again") from None
    eos, bos = meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.bos_token_id")
    if eos is None or not 0 <= eos < len(tokens):
        raise UsageError(f"{path} names no end-of-text token (tokenizer.ggml.eos_token_id): the model could not stop")
    return Tokenizer(backend, int(eos), path, int(bos) if bos is not None else None)


def read_gguf(path: str) -> GGUFModel:
    """A Llama-architecture GGUF as our config, fp32 state dict (tied when there is no output.weight) and tokenizer."""
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UsageError(f"{path} is a {arch!r} model: from-gguf imports the 'llama' architecture only "
                         "(Llama, SmolLM, TinyLlama and other Llama-family models)")
    tokenizer = gguf_tokenizer(meta, path)
    config = model_config_from_gguf(meta, tokenizer.vocab_size, path)
    state_dict = read_tensors(reader, config, path)
    tied = "lm_head.weight" not in state_dict
    config = ModelConfig(**{**vars(config), "tie_embeddings": tied})
    if tied and "embed.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["embed.weight"]  # llama.cpp's rule: no output.weight = tied
    tensor_types = {}
    for t in reader.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return GGUFModel(config, state_dict, tokenizer, meta.get("tokenizer.chat_template"),
                     int(eot) if eot is not None else None, tensor_types)
