"""Tests for convert.py: our checkpoints <-> Hugging Face Llama/Mistral folders, proven with transformers itself.

Every model is tiny and random (or the shared 6-step tiny run); nothing is downloaded.

    pytest tests/test_convert.py -q
"""

import json

import pytest
import torch

import convert
import eval_val
import evaluate_checkpoints
import finetune
import infer
from checkpoint import load_checkpoint, save_checkpoint
from cli import UsageError
from infer import load_model
from model import ModelConfig, Transformer
from chat import format_instruction, instruction_chat_template
from tokenizer import load_tokenizer
from conftest import ROOT, run_script

transformers = pytest.importorskip("transformers")

SAMPLE = "The cat sat on the mat. Attention is all you need, isn't it? Caf\u00e9 \u00fcber 42 \U0001F600"


def hf_load(folder):
    """What a user of the exported folder does (eager attention: HF's plain reference path)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def word_tokenizer_folder(folder, n_words=120):
    """A small local tokenizer folder (word-level, 2 special tokens), as a downloaded model would have."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for w in open(ROOT / "data" / "tiny_corpus.txt", encoding="utf-8").read().split() if w.isalpha()})[:n_words]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "bos_token": "</s>", "unk_token": "<unk>"}))
    return folder, words


def save_tiny_checkpoint(path, tokenizer_spec, seed=0, **model_fields):
    """A random model written as a checkpoint, with the meta every script reads (as train.py writes it)."""
    fields = dict(vocab_size=128, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48,
                  rope_theta=500.0, norm_eps=1e-6)  # non-default values, so a dropped field would show
    fields.update(model_fields)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():  # norm gains away from 1, so a swapped norm cannot hide; large enough
            p.add_(torch.randn_like(p) * 0.3)  # that greedy decoding varies (tied embeddings at init repeat a token)
    meta = {"kind": "sft", "step": 7, "model_config": vars(model.config).copy(), "tokenizer": tokenizer_spec}
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(path))
    return model.eval()


def greedy_same_as_infer(hf, ours, prompt_ids, n_new, tokenizer):
    """transformers.generate(do_sample=False) and infer.py's greedy decoding pick the same tokens; returns them.

    Both stop at the end-of-text token (HF includes it, infer.py does not print it); neither can choose
    a padding row (our model's logits cover the vocabulary only, and the export holds no padding rows).
    """
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, do_sample=False)
    theirs = out[0, len(prompt_ids):].tolist()
    if tokenizer.eos_id in theirs:
        theirs = theirs[:theirs.index(tokenizer.eos_id)]
    steps = infer.generate(ours, prompt_ids, n_new, {"temperature": 0}, [None])
    mine = [tokens.item() for tokens, _ in steps]
    assert mine[:len(theirs)] == theirs
    assert len(theirs) == n_new or mine[len(theirs)] == tokenizer.eos_id
    return theirs


# ---------------------------------------------------------------- ours -> Hugging Face


def test_trained_checkpoint_exports_and_generates_like_infer(tiny_ckpt, tmp_path, capsys):
    """The shared tiny run -> HF folder: same logits, same tokenizer ids, same greedy text as infer.py.

    Scripts run in-process through their main(argv) (same code path as the command line, no
    interpreter start-up); test_refusal_is_one_line_and_exit_code_2 runs convert.py as a real process.
    """
    out = tmp_path / "hf"
    assert convert.main(["to-hf", "--ckpt", str(tiny_ckpt), "--out", str(out)]) == 0
    hf, hf_tok = hf_load(out)
    ours, ckpt = load_model(str(tiny_ckpt))
    meta = ckpt["meta"]
    tok = load_tokenizer("gpt2")
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
    assert hf.config.vocab_size == meta["model_config"]["vocab_size"]  # padded rows kept, like ours

    ids = hf_tok(SAMPLE)["input_ids"]
    assert ids == tok.encode(SAMPLE)  # no BOS added, same BPE
    assert hf_tok.decode(ids) == tok.decode(ids) == SAMPLE
    assert hf_tok.eos_token_id == hf.config.eos_token_id == tok.eos_id

    idx = torch.tensor([ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx))

    # Greedy decoding: transformers.generate vs infer.py --temperature 0, token for token (within the window).
    prompt = "Attention is"
    prompt_ids = tok.encode(prompt)
    n_new = meta["model_config"]["max_seq_len"] - len(prompt_ids)
    theirs = greedy_same_as_infer(hf, ours, prompt_ids, n_new, tok)
    capsys.readouterr()
    infer.main(["--ckpt", str(tiny_ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n_new),
                "--device", "cpu"])
    assert capsys.readouterr().out.rstrip("\n") == prompt + tok.decode(theirs)  # and the command line prints it


@pytest.mark.parametrize("n_kv_heads, tie", [(4, True), (2, True), (1, True), (2, False), (4, False)],
                         ids=["mha-tied", "gqa-tied", "mqa-tied", "gqa-untied", "mha-untied"])
def test_export_logits_match(tmp_path, n_kv_heads, tie):
    """MHA/GQA/MQA, tied and untied: AutoModelForCausalLM on the folder computes our logits and greedy tokens."""
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    ours = save_tiny_checkpoint(tmp_path / "m.ckpt", str(tok_dir), n_kv_heads=n_kv_heads, tie_embeddings=tie)
    assert convert.main(["to-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf, _ = hf_load(tmp_path / "hf")
    assert hf.config.num_key_value_heads == n_kv_heads and hf.config.tie_word_embeddings == tie
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)  # a tied matrix is stored once
    idx = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx))
    generated = greedy_same_as_infer(hf, ours, [5, 9, 3], 40, load_tokenizer(str(tok_dir)))
    assert len(set(generated)) > 3  # a real sequence, not one token repeated


def test_sliding_window_exports_as_mistral(tmp_path):
    """swa_window = w becomes MistralConfig(sliding_window=w): same logits over several windows."""
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    ours = save_tiny_checkpoint(tmp_path / "m.ckpt", str(tok_dir), swa_window=6)
    convert.main(["to-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "hf")])
    hf, _ = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 6
    idx = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx))


def test_tokenizer_folder_round_trip(tmp_path):
    """A local tokenizer folder is copied: AutoTokenizer on the export gives tokenizer.load_tokenizer's ids."""
    tok_dir, words = word_tokenizer_folder(tmp_path / "tok")
    save_tiny_checkpoint(tmp_path / "m.ckpt", str(tok_dir))
    convert.main(["to-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "hf")])
    text = " ".join(words[::3]) + " zzz-unknown"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(str(tmp_path / "hf"))
    assert hf_tok(text)["input_ids"] == ours.encode(text) == load_tokenizer(str(tok_dir)).encode(text)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 1 and config["rope_theta"] == 500.0 and config["dtype"] == "float32"


def test_to_hf_refuses_a_non_empty_folder(tmp_path, tiny_ckpt):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        convert.main(["to-hf", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "hf")])
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- chat template, tokenizer and generation settings


CONTEXT = 96  # room for three chat turns


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory):
    """A tiny random SFT checkpoint (GPT-2 tokenizer) and its to-hf folder: (checkpoint, folder)."""
    folder = tmp_path_factory.mktemp("sft_export")
    save_tiny_checkpoint(folder / "sft.ckpt", "gpt2", vocab_size=50257, max_seq_len=CONTEXT)
    assert convert.main(["to-hf", "--ckpt", str(folder / "sft.ckpt"), "--out", str(folder / "hf")]) == 0
    return folder / "sft.ckpt", folder / "hf"


# (instruction, input): blanks, padding, several lines, quotes, backslashes, Jinja syntax, non-ASCII whitespace
TEMPLATE_CASES = [("What is attention?", None), ("  padded\n ", ""), ("Sum these.", "1 2 3"), ("Sum these.", "   "),
                  ("line one\nline two\n\nthree", "  x\ny  "), ("it's \"quoted\" \\n not a newline", "{{ 1 + 1 }} {% if %}"),
                  ("\u3000caf\u00e9 \U0001F600\u00a0", "\t\u00fcber\n"), ("", None), ("### Response:", "### Instruction:")]


@pytest.mark.parametrize("instruction, input_text", TEMPLATE_CASES)
def test_chat_template_renders_format_instruction(sft_export, instruction, input_text):
    """apply_chat_template([user]) with the generation prompt is format_instruction, exactly (an "input" key too)."""
    tok = transformers.AutoTokenizer.from_pretrained(sft_export[1])
    message = {"role": "user", "content": instruction} | ({} if input_text is None else {"input": input_text})
    rendered = tok.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    assert rendered == format_instruction(instruction, input_text or "")
    without_prompt = tok.apply_chat_template([message], tokenize=False, add_generation_prompt=False)
    assert rendered.startswith(without_prompt) and "### Response:" not in without_prompt[-len("### Response:\n"):]


def test_chat_template_system_message_and_refusals(sft_export):
    """A leading system message is the instruction's first paragraph; roles out of turn order are refused."""
    tok = transformers.AutoTokenizer.from_pretrained(sft_export[1])
    render = lambda messages: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Why?"}]) == \
        format_instruction("Be brief.\n\nWhy?")
    assert render([{"role": "system", "content": "  "}, {"role": "user", "content": "Why?"}]) == format_instruction("Why?")
    for bad in ([{"role": "assistant", "content": "Hi"}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
                [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}]):
        with pytest.raises(Exception, match="user and assistant turns in turn"):
            render(bad)


def test_multi_turn_chat_renders_as_infer_chat_builds_it(sft_export, monkeypatch, capsys):
    """infer.py --interactive's prompt at every turn == the chat template on the same conversation, id for id."""
    ckpt, folder = sft_export
    replies = iter([" Paris.\n\n", "Caf\u00e9 \U0001F600", "\nthree"])
    lines = iter(["What is the capital of France?", "  And a word with an accent? ", "Count to three."])
    seen = []

    def fake_complete(model, head, tokenizer, prompt_ids, args, seed, stops, stream_to=None):
        seen.append(list(prompt_ids))
        return [next(replies)], [1.0]

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(infer, "complete", fake_complete)
    monkeypatch.setattr("builtins.input", fake_input)
    assert infer.main(["--ckpt", str(ckpt), "--interactive", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    users = ["What is the capital of France?", "  And a word with an accent? ", "Count to three."]
    answers = [" Paris.\n\n", "Caf\u00e9 \U0001F600", "\nthree"]
    assert len(seen) == 3
    for turn in range(3):
        messages = []
        for user, answer in zip(users[:turn], answers[:turn]):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": users[turn]})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == seen[turn], turn


def test_pipeline_chat_greedy_equals_infer(sft_export, capsys):
    """transformers.pipeline on a messages list continues exactly as infer.py --temperature 0 on the instruction."""
    ckpt, folder = sft_export
    question, n_new = "What is attention?", 20
    chat = transformers.pipeline("text-generation", str(folder))
    out = chat([{"role": "user", "content": question}], do_sample=False, max_new_tokens=n_new)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    capsys.readouterr()
    infer.main(["--ckpt", str(ckpt), "--prompt", question, "--temperature", "0", "--max-new-tokens", str(n_new),
                "--device", "cpu"])
    printed = capsys.readouterr().out
    assert printed == reply["content"] + "\n" and len(set(reply["content"])) > 3


def test_tokenizer_config_and_generation_config(sft_export):
    """No token_type_ids go to the model, and a plain pipeline call stops at the context (max_length).

    transformers 5 behaviour, pinned here: an explicit max_new_tokens takes precedence over max_length
    (it logs that it does) and generates past the context; transformers only warns ("exceeded the
    model's predefined maximum length"). infer.py instead slides its window over the most recent tokens.
    """
    ckpt, folder = sft_export
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["model_input_names"] == ["input_ids", "attention_mask"] and settings["model_max_length"] == CONTEXT
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert set(tok("The cat")) == {"input_ids", "attention_mask"}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["max_length"] == CONTEXT
    pipe = transformers.pipeline("text-generation", str(folder))
    no_eos = [[tok.eos_token_id]]  # so that only the length can stop it
    plain = pipe("The cat", do_sample=False, bad_words_ids=no_eos, return_tensors=True)
    assert len(plain[0]["generated_token_ids"]) == CONTEXT  # prompt + new tokens = the context, no more
    longer = pipe("The cat", do_sample=False, bad_words_ids=no_eos, return_tensors=True, max_new_tokens=CONTEXT)
    assert len(longer[0]["generated_token_ids"]) == len(tok("The cat")["input_ids"]) + CONTEXT


def test_imported_chat_template_travels_until_fine_tuned(tmp_path):
    """from-hf keeps a model's own template (tokenizer_config.json or chat_template.jinja); to-hf and to-gguf
    export it, also once fine-tuned here (finetune.py trains on it and keeps it); a checkpoint fine-tuned here
    without one (kind sft) exports the instruction template."""
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    theirs = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    for source in ("tokenizer_config.json", "chat_template.jinja"):
        folder = tmp_path / source
        hf_folder(folder, tok_dir)
        if source == "chat_template.jinja":
            (folder / source).write_text(theirs)
        else:
            settings = json.loads((folder / source).read_text())
            (folder / source).write_text(json.dumps(settings | {"chat_template": theirs}))
        ckpt = tmp_path / f"{source}.ckpt"
        assert convert.main(["from-hf", "--model", str(folder), "--out", str(ckpt)]) == 0
        assert load_checkpoint(str(ckpt))["meta"]["chat_template"] == theirs
        convert.main(["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / f"{source}-hf")])
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / f"{source}-hf").chat_template == theirs
    fine_tuned = load_checkpoint(str(ckpt))  # what finetune.py writes: kind sft, the template it trained on kept
    fine_tuned["meta"]["kind"] = "sft"
    save_checkpoint(fine_tuned, str(tmp_path / "sft.ckpt"))
    convert.main(["to-hf", "--ckpt", str(tmp_path / "sft.ckpt"), "--out", str(tmp_path / "sft-hf")])
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "sft-hf").chat_template == theirs
    del fine_tuned["meta"]["chat_template"]  # fine-tuned here on a base without one: the instruction template
    save_checkpoint(fine_tuned, str(tmp_path / "sft-ours.ckpt"))
    convert.main(["to-hf", "--ckpt", str(tmp_path / "sft-ours.ckpt"), "--out", str(tmp_path / "sft-ours-hf")])
    assert not (tmp_path / "sft-ours-hf" / "chat_template.jinja").exists()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "sft-ours-hf").chat_template == \
        instruction_chat_template()


def test_pretrained_export_has_no_chat_template(tiny_ckpt, tmp_path):
    convert.main(["to-hf", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "hf")])
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())


# ---------------------------------------------------------------- Hugging Face -> ours


def hf_folder(folder, tok_dir, hf_class=transformers.LlamaForCausalLM, safe=True, **config):
    """A random model saved by transformers itself (save_pretrained), with tokenizer files beside it."""
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 300.0})
    fields.update(config)
    config_class = transformers.MistralConfig if hf_class is transformers.MistralForCausalLM else transformers.LlamaConfig
    torch.manual_seed(1)
    model = hf_class(config_class(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=safe)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tok_dir / name).read_bytes())
    return model


@pytest.mark.parametrize("tie, safe", [(False, True), (True, True), (False, False)],
                         ids=["untied-safetensors", "tied-safetensors", "untied-bin"])
def test_import_llama_logits_match(tmp_path, tie, safe):
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    hf = hf_folder(tmp_path / "hf", tok_dir, safe=safe, tie_word_embeddings=tie)
    assert convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "m.ckpt")]) == 0
    ours, ckpt = load_model(str(tmp_path / "m.ckpt"))
    meta = ckpt["meta"]
    assert meta["model_config"]["rope_theta"] == 300.0 and meta["model_config"]["tie_embeddings"] == tie
    # config.json's 128 rows hold the tokenizer's 122 tokens: ours keeps the tokenizer's size, padded to 128 rows.
    vocab = load_tokenizer(str(tok_dir)).vocab_size
    assert ours.config.vocab_size == vocab == 122 and ours.embed.weight.shape[0] == 128
    idx = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits[..., :vocab])


def test_import_mistral_sliding_window(tmp_path):
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    hf = hf_folder(tmp_path / "hf", tok_dir, transformers.MistralForCausalLM, sliding_window=5)
    hf.config._attn_implementation = "eager"
    convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "m.ckpt")])
    ours, ckpt = load_model(str(tmp_path / "m.ckpt"))
    assert ckpt["meta"]["model_config"]["swa_window"] == 5
    idx = torch.randint(0, ours.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits[..., :ours.config.vocab_size])


def test_export_then_import_gives_back_the_same_weights(tiny_ckpt, tmp_path):
    convert.main(["to-hf", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "hf")])
    convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back.ckpt")])
    before, after = (load_checkpoint(str(p)) for p in (tiny_ckpt, tmp_path / "back.ckpt"))
    vocab = before["meta"]["model_config"]["vocab_size"]
    assert after["meta"]["model_config"]["vocab_size"] == vocab == 50257  # Hugging Face held 50257 rows
    before, after = before["state_dict"], after["state_dict"]
    assert before.keys() == after.keys()
    for name in before:
        if name in ("embed.weight", "lm_head.weight"):  # the padding rows come back as zeros: they are no token
            assert torch.equal(before[name][:vocab], after[name][:vocab]) and not after[name][vocab:].any(), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_imported_checkpoint_works_in_every_script(tmp_path, capsys):
    """infer.py, eval_val.py, evaluate_checkpoints.py and finetune.py take an imported checkpoint like a trained one."""
    tok_dir, words = word_tokenizer_folder(tmp_path / "tok")
    hf_folder(tmp_path / "hf", tok_dir)
    ckpt = str(tmp_path / "m.ckpt")
    convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", ckpt, "--max-seq-len", "32"])
    meta = json.loads((tmp_path / "m.ckpt.json").read_text())["meta"]  # the sidecar list.py reads
    assert meta["kind"] == "pretrain" and meta["step"] == 0 and meta["model_config"]["max_seq_len"] == 32
    assert meta["config"]["data"]["tokenizer_name"] == meta["tokenizer"] == str(tmp_path / "hf")
    capsys.readouterr()
    prompt = " ".join(words[:3])
    infer.main(["--ckpt", ckpt, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.startswith(prompt)
    assert eval_val.main(["--ckpt", ckpt, "--device", "cpu", "--max-batches", "1"]) == 0
    assert "val_loss" in capsys.readouterr().out
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"- prompt: {words[0]}\n  target: ' {words[1]}'\n")
    assert evaluate_checkpoints.main(["--checkpoints", ckpt, "--cases", str(cases), "--device", "cpu"]) == 0
    # and as the base of instruction fine-tuning (--dry-run checks base, tokenizer and data, then stops)
    assert finetune.main(["--config", str(ROOT / "config_finetune_smoke.yaml"), "--dry-run",
                          "--set", f"finetune.base_checkpoint={ckpt}", "--set", "training.seq_len=32",
                          "--set", f"training.checkpoint_dir={tmp_path / 'sft'}"]) == 0


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope scaling"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "only Llama and Mistral"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
])
def test_import_refuses_unsupported_features(tmp_path, change, message):
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    hf_folder(tmp_path / "hf", tok_dir)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=message):
        convert.main(["from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "m.ckpt")])
    assert not (tmp_path / "m.ckpt").exists()


def test_refusal_is_one_line_and_exit_code_2(tmp_path):
    tok_dir, _ = word_tokenizer_folder(tmp_path / "tok")
    hf_folder(tmp_path / "hf", tok_dir, attention_bias=True)
    result = run_script("convert.py", "from-hf", "--model", tmp_path / "hf", "--out", tmp_path / "m.ckpt", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "attention_bias" in result.stderr and not (tmp_path / "m.ckpt").exists()


@pytest.mark.parametrize("command", ["to-hf", "to-gguf"])
def test_a_model_off_the_llama_recipe_is_not_exported(tmp_path, command):
    """Hugging Face's Llama and llama.cpp would load the weights and compute another network: refused, one line."""
    ckpt = tmp_path / "relu2.ckpt"
    save_tiny_checkpoint(ckpt, "gpt2", vocab_size=50257, mlp="relu2", qk_norm=True)
    out = tmp_path / ("hf" if command == "to-hf" else "m.gguf")
    with pytest.raises(UsageError, match=r"uses model.mlp=relu2, model.qk_norm=True, which .* does not compute"):
        convert.main([command, "--ckpt", str(ckpt), "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())
