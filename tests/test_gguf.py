"""Tests for convert.py to-gguf: the file llama.cpp loads, read back with the gguf package's own reader.

Every tensor comes back equal to the checkpoint's (exactly in f32, f16 and bf16, within half a step
in q8_0) once the q/k permutation is undone; the permutation itself is proven to leave attention
unchanged; every metadata key is checked; the token list and merges rebuild our tokenizer. Running
the file in llama.cpp itself is a manual check (docs/CONVERT.md says what was run).

    pytest tests/test_gguf.py -q
"""

import json

import pytest
import torch

import chat
import convert
from checkpoint import load_checkpoint, save_checkpoint
from cli import UsageError
from model import ModelConfig, Transformer, apply_rope, rope_cos_sin
from tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")

SAMPLE = "The cat sat on the mat.<|endoftext|>Attention is all you need, isn't it?\n\n  Caf\u00e9 \u00fcber 42 \U0001F600"


def write_checkpoint(path, tokenizer="gpt2", kind="pretrain", seed=0, **fields):
    """A random model saved as a checkpoint; rope_theta and norm_eps off their defaults so a dropped key shows."""
    config = dict(vocab_size=50257, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=40,
                  rope_theta=500.0, norm_eps=1e-6)
    config.update(fields)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**config))
    with torch.no_grad():
        for p in model.parameters():  # norm gains away from 1, so a norm stored as another tensor would show
            p.add_(torch.randn_like(p) * 0.3)
    meta = {"kind": kind, "step": 3, "model_config": vars(model.config).copy(), "tokenizer": tokenizer}
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(path))
    return path


def export(ckpt, out, *flags):
    assert convert.main(["to-gguf", "--ckpt", str(ckpt), "--out", str(out), *flags]) == 0
    return gguf.GGUFReader(str(out))


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def from_ggml_rope_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of convert.to_ggml_rope_layout: row 2i + j of each head goes back to j * head_dim/2 + i."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def read_tensors(reader, config: ModelConfig) -> dict:
    """Our parameter name -> the file's tensor as fp32 in our layout (dequantized, q/k permutation undone)."""
    ours = {theirs: name for name, theirs in convert.gguf_tensor_names(config.n_layers).items()}
    tensors = {}
    for t in reader.tensors:
        name = ours[t.name]
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        values = values.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dimensions innermost first
        if name.endswith("q_proj.weight"):
            values = from_ggml_rope_layout(values, config.n_heads)
        elif name.endswith("k_proj.weight"):
            values = from_ggml_rope_layout(values, config.n_kv_heads)
        tensors[name] = (values, t.tensor_type)
    return tensors


# ---------------------------------------------------------------- the q/k permutation


def rope_interleaved(x, positions, theta):
    """GGML's Llama RoPE ("normal" mode): pair 2i with 2i + 1, angle position * theta^(-2i/head_dim).  x: (T, H, D)"""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)  # (T, D/2), the same angles as ours
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_permuted_q_k_give_the_same_attention_scores(n_heads, n_kv_heads):
    """Our split-halves RoPE on the original q/k weights == GGML's interleaved RoPE on the permuted ones."""
    torch.manual_seed(0)
    d_model, head_dim, T, theta = 64, 16, 11, 500.0
    wq, wk = (torch.randn(n * head_dim, d_model) / d_model**0.5 for n in (n_heads, n_kv_heads))  # scores ~ 4
    x, positions = torch.randn(T, d_model), torch.arange(T)
    cos, sin = rope_cos_sin(positions, head_dim, theta)

    def scores(q, k):  # (H, T, T) with each K/V head shared by its group of query heads
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    q, k = (x @ wq.T).view(T, n_heads, head_dim), (x @ wk.T).view(T, n_kv_heads, head_dim)
    ours = scores(apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0])
    pq, pk = convert.to_ggml_rope_layout(wq, n_heads), convert.to_ggml_rope_layout(wk, n_kv_heads)
    q2, k2 = (x @ pq.T).view(T, n_heads, head_dim), (x @ pk.T).view(T, n_kv_heads, head_dim)
    theirs = scores(rope_interleaved(q2, positions, theta), rope_interleaved(k2, positions, theta))
    torch.testing.assert_close(theirs, ours)
    unpermuted = scores(rope_interleaved(q, positions, theta), rope_interleaved(k, positions, theta))
    assert not torch.allclose(unpermuted, ours, atol=1e-3)  # without the permutation llama.cpp would differ
    assert torch.equal(from_ggml_rope_layout(pq, n_heads), wq)


# ---------------------------------------------------------------- the file, read back


def trained_tokenizer_folder(folder):
    """A byte-level BPE trained by train_tokenizer.py on the bundled corpus (400 entries, 2 special tokens)."""
    import train_tokenizer
    from conftest import ROOT

    assert train_tokenizer.main(["--input", str(ROOT / "data" / "tiny_corpus.txt"), "--vocab-size", "400",
                                 "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    return str(trained_tokenizer_folder(tmp_path_factory.mktemp("gguf_tokenizer") / "tok"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, trained_tokenizer):
    """Models on the small trained tokenizer (400 tokens; the model pads its embedding to 448 rows): quick to write."""
    folder = tmp_path_factory.mktemp("gguf")
    small = dict(tokenizer=trained_tokenizer, vocab_size=400)
    return {"tied": write_checkpoint(folder / "tied.ckpt", **small),
            "untied-sft": write_checkpoint(folder / "sft.ckpt", kind="sft", tie_embeddings=False, n_kv_heads=4, **small),
            # d_model 48: rows of 48 cannot be cut into q8_0's blocks of 32 (the MLP's down_proj rows of 96 can)
            "odd-width": write_checkpoint(folder / "odd.ckpt", d_model=48, n_heads=4, n_kv_heads=1, d_ff=96, **small)}


def expected(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """What the file should hold: f16 and bf16 are exact roundings (to nearest, ties to even) of the fp32 weight."""
    return {"f32": weight, "f16": weight.half().float(), "bf16": weight.bfloat16().float()}[dtype]


@pytest.mark.parametrize("dtype", convert.GGUF_DTYPES)
@pytest.mark.parametrize("which", ["tied", "untied-sft", "odd-width"])
def test_every_tensor_round_trips(checkpoints, tmp_path, dtype, which):
    ckpt = load_checkpoint(str(checkpoints[which]))
    config = ModelConfig(**ckpt["meta"]["model_config"])
    reader = export(checkpoints[which], tmp_path / "m.gguf", "--dtype", dtype)
    tensors = read_tensors(reader, config)
    state = ckpt["state_dict"]
    assert set(tensors) == set(state) - ({"lm_head.weight"} if config.tie_embeddings else set())
    n_tokens = 400  # the tokenizer's: the embedding's padding rows (to 448) are left out
    for name, (values, qtype) in tensors.items():
        weight = state[name].float()
        weight = weight[:n_tokens] if name in ("embed.weight", "lm_head.weight") else weight
        assert values.shape == weight.shape, name
        if weight.dim() == 1 or dtype == "f32":
            assert qtype == gguf.GGMLQuantizationType.F32 and torch.equal(values, weight), name  # norms: always f32
        elif dtype != "q8_0":
            assert qtype.name == dtype.upper() and torch.equal(values, expected(weight, dtype)), name
        elif weight.shape[-1] % 32:
            assert qtype == gguf.GGMLQuantizationType.F16 and torch.equal(values, expected(weight, "f16")), name
        else:  # q8_0: per block of 32, int8 times a scale (step) of max|w|/127, itself rounded to f16
            assert qtype == gguf.GGMLQuantizationType.Q8_0, name
            step = weight.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
            error = (values - weight).reshape(-1, 32).abs()
            assert (error <= step * (0.5 + 127 / 2048) + 1e-7).all(), name  # the scale itself is rounded to f16
            assert error.max() > 0  # really quantized


def test_q8_0_keeps_rows_it_cannot_block_in_f16(checkpoints, tmp_path, capsys):
    export(checkpoints["odd-width"], tmp_path / "m.gguf", "--dtype", "q8_0")
    out = capsys.readouterr().out
    assert "kept in f16 (rows not a multiple of 32): token_embd.weight, blk.0.attn_q.weight" in out
    assert "ffn_down" not in out


def test_metadata(checkpoints, tmp_path):
    """Every key, for an SFT model with GPT-2's tokenizer; then the file type of each --dtype."""
    ckpt = write_checkpoint(tmp_path / "sft.ckpt", kind="sft", tie_embeddings=False, n_kv_heads=1)
    c = ModelConfig(**load_checkpoint(str(ckpt))["meta"]["model_config"])
    found = fields(export(ckpt, tmp_path / "tiny-sft.gguf", "--dtype", "q8_0"))
    tokens, token_types, merges = (found.pop(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                           "tokenizer.ggml.merges"))
    assert found == {
        "general.architecture": "llama", "general.name": "tiny-sft",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "general.quantization_version": 2,
        "llama.context_length": c.max_seq_len, "llama.embedding_length": c.d_model, "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.d_ff, "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads, "llama.rope.freq_base": 500.0,
        "llama.rope.dimension_count": c.head_dim, "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        "llama.vocab_size": 50257, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.pretokenizer": convert.GPT2_SPLIT,
        "tokenizer.ggml.eos_token_id": 50256, "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": chat.instruction_chat_template(),  # an SFT checkpoint
    }
    assert len(tokens) == len(token_types) == 50257 and len(merges) == 50000
    assert tokens[50256] == "<|endoftext|>" and token_types[50256] == gguf.TokenType.CONTROL
    assert set(token_types[:50256]) == {gguf.TokenType.NORMAL}
    for dtype, file_type in [("f32", "ALL_F32"), ("f16", "MOSTLY_F16"), ("bf16", "MOSTLY_BF16")]:
        found = fields(export(checkpoints["tied"], tmp_path / f"{dtype}.gguf", "--dtype", dtype, "--overwrite"))
        assert found["general.file_type"] == int(gguf.LlamaFileType[file_type])
        assert "general.quantization_version" not in found and "tokenizer.chat_template" not in found  # pretrain


def rebuilt_tokenizer(found: dict):
    """A `tokenizers` byte-level BPE made only from the file's token list, token types and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, types = found["tokenizer.ggml.tokens"], found["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in found["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # what "gpt-2" means to llama.cpp
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL])
    return backend


@pytest.mark.parametrize("tokenizer", ["gpt2", "train_tokenizer.py"])
def test_tokenizer_inside_reproduces_our_ids(tmp_path, trained_tokenizer, tokenizer):
    spec = "gpt2" if tokenizer == "gpt2" else trained_tokenizer
    ours = load_tokenizer(spec)
    write_checkpoint(tmp_path / "m.ckpt", tokenizer=spec, vocab_size=ours.vocab_size + 7)  # padded rows too
    found = fields(export(tmp_path / "m.ckpt", tmp_path / "m.gguf"))
    assert found["llama.vocab_size"] == len(found["tokenizer.ggml.tokens"]) == ours.vocab_size
    assert found["tokenizer.ggml.eos_token_id"] == ours.eos_id
    rebuilt = rebuilt_tokenizer(found)
    text = SAMPLE + " " + open(__file__, encoding="utf-8").read()[:3000]
    ids = rebuilt.encode(text, add_special_tokens=False).ids
    assert ids == ours.encode(text) and len(ids) > 500
    assert rebuilt.decode(ids, skip_special_tokens=False) == ours.decode(ids) == text


def test_split_rule_for_ollama_is_gpt2s():
    """tokenizer.ggml.pretokenizer (read by Ollama's engine) cuts text exactly like our ByteLevel pre-tokenizer."""
    regex = pytest.importorskip("regex")  # a dependency of transformers; Python's re has no \\p{L}
    from tokenizers import decoders, pre_tokenizers

    text = SAMPLE + " 42,000.5 don't I'LL\t\n\n  x " + open(__file__, encoding="utf-8").read()[:3000]
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    ours = [decoders.ByteLevel().decode([piece]) for piece, _ in pieces]
    assert regex.findall(convert.GPT2_SPLIT, text) == ours and len(ours) > 500


# ---------------------------------------------------------------- refusals


def word_tokenizer_folder(folder):
    """A word-level tokenizer folder: a kind llama.cpp's "gpt2" vocabulary cannot express."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "the": 2, "cat": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def test_refusals(checkpoints, tmp_path):
    write_checkpoint(tmp_path / "swa.ckpt", swa_window=8)
    with pytest.raises(UsageError, match=r"sliding-window attention \(swa_window 8\).*to-hf"):
        convert.main(["to-gguf", "--ckpt", str(tmp_path / "swa.ckpt"), "--out", str(tmp_path / "m.gguf")])
    write_checkpoint(tmp_path / "words.ckpt", tokenizer=str(word_tokenizer_folder(tmp_path / "words")), vocab_size=64)
    with pytest.raises(UsageError, match=r"byte-level BPE .* WordLevel tokenizer .*convert_hf_to_gguf"):
        convert.main(["to-gguf", "--ckpt", str(tmp_path / "words.ckpt"), "--out", str(tmp_path / "m.gguf")])
    (tmp_path / "mine.gguf").write_text("keep me")
    with pytest.raises(UsageError, match="exists: pick a new name or pass --overwrite"):
        convert.main(["to-gguf", "--ckpt", str(checkpoints["tied"]), "--out", str(tmp_path / "mine.gguf")])
    assert (tmp_path / "mine.gguf").read_text() == "keep me"
    with pytest.raises(UsageError, match="does not exist: create it first"):
        convert.main(["to-gguf", "--ckpt", str(checkpoints["tied"]), "--out", str(tmp_path / "no" / "m.gguf")])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["mine.gguf"]
    assert json.loads((tmp_path / "swa.ckpt.json").read_text())["meta"]["model_config"]["swa_window"] == 8
