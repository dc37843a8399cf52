"""infer.py: sampling filters equal Hugging Face's, KV-cached decoding equals full forwards, seeds
reproduce, --stop and streaming cut text exactly, and the CLI works end to end on a tiny checkpoint.

The checkpoint is built here directly (random weights, GPT-2 tokenizer): a random model writes
nonsense, but nonsense is enough to check that every mechanism does exactly what it promises.
"""

import pytest
import torch
import torch.nn as nn

import infer
from checkpoint import save_checkpoint
from cli import UsageError
from infer import load_model
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer
from tests.conftest import run_script

MAX_SEQ_LEN = 32


def write_checkpoint(path, kind="pretrain", vocab_size=50257, seed=0):
    """A tiny random model saved the way train.py saves one (model.-prefixed weights + meta)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_seq_len=MAX_SEQ_LEN)
    model = Transformer(config)
    with torch.no_grad():  # sharper than the 0.02 init, so that different seeds give different samples
        model.embed.weight.mul_(5)
    meta = {"kind": kind, "step": 7, "epoch": 0.5, "tokens_seen": 1000, "train_loss": 5.0, "val_loss": 5.5,
            "n_params": model.num_parameters(), "model_config": vars(config), "config": {}, "tokenizer": "gpt2"}
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(path))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("infer") / "tiny.ckpt")


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("infer_sft") / "sft.ckpt", kind="sft")


@pytest.fixture(scope="module")
def loaded(ckpt):
    model, _ = load_model(str(ckpt))
    return model, load_tokenizer("gpt2")


def settings(**changes):
    values = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0}
    return {**values, **changes}


def greedy_tokens(model, tokenizer, prompt_ids, n, **changes):
    steps = infer.generate(model, prompt_ids, n, settings(temperature=0.0, **changes), [torch.Generator()])
    return [tokens.item() for tokens, _ in steps]


# --- process_logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, penalty, ngram", [
    (1.0, 0, 1.0, 0.0, 1.3, 0),  # each filter alone
    (0.7, 0, 1.0, 0.0, 1.0, 0),
    (1.0, 10, 1.0, 0.0, 1.0, 0),
    (1.0, 0, 0.8, 0.0, 1.0, 0),
    (1.0, 0, 1.0, 0.2, 1.0, 0),
    (1.0, 0, 1.0, 0.0, 1.0, 2),
    (0.6, 40, 0.9, 0.05, 1.5, 3),  # all of them, in Hugging Face's order
    (1.5, 5, 0.5, 0.1, 0.8, 1),
])
def test_process_logits_equals_transformers_processors(temperature, top_k, top_p, min_p, penalty, ngram):
    from transformers import (LogitsProcessorList, MinPLogitsWarper, NoRepeatNGramLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    torch.manual_seed(temperature * 100 + top_k)
    logits = torch.randn(4, 300) * 3
    ids = torch.randint(0, 40, (4, 30))  # a small id range, so that n-grams really repeat
    hf = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []
    hf += [NoRepeatNGramLogitsProcessor(ngram)] if ngram else []
    hf += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    hf += [TopKLogitsWarper(top_k)] if top_k else []
    hf += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    hf += [MinPLogitsWarper(min_p)] if min_p else []
    expected = LogitsProcessorList(hf)(ids, logits.clone())

    before = logits.clone()
    ours = infer.process_logits(logits, ids, temperature, top_k, top_p, min_p, penalty, no_repeat_ngram_size=ngram)
    torch.testing.assert_close(ours, expected)  # -inf where removed, equal values elsewhere
    assert torch.equal(logits, before), "process_logits must not modify its input"
    assert torch.isinf(ours).any() or (top_k == 0 and top_p == 1 and not min_p and not ngram)


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = infer.process_logits(logits, torch.tensor([[0, 1]]), repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]  # positive divided, negative multiplied, unseen untouched


def test_greedy_keeps_only_the_filters_that_matter():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert infer.process_logits(logits, torch.tensor([[0]]), temperature=0.0).argmax().item() == 0
    penalised = infer.process_logits(logits, torch.tensor([[0]]), temperature=0.0, repetition_penalty=2.0)
    assert penalised.argmax().item() == 1  # 5/2 < 4: the repetition penalty changes the greedy choice
    banned = infer.process_logits(logits, torch.tensor([[2, 0, 2]]), temperature=0.0, no_repeat_ngram_size=2)
    assert banned.argmax().item() == 1  # "2 0" already occurred, so 0 may not follow 2 again


# --- generation --------------------------------------------------------------------------------


def test_greedy_with_kv_cache_equals_argmax_over_full_forwards(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("The history of")
    cached = greedy_tokens(model, tokenizer, prompt, MAX_SEQ_LEN - len(prompt))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(cached)):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert cached == ids[len(prompt):]
    with torch.no_grad():  # the prefill asks for the last position only: same numbers, less work
        torch.testing.assert_close(model(torch.tensor([ids]), last_only=True), model(torch.tensor([ids]))[:, -1:])


def test_logprobs_are_the_models_own_and_context_overflow_keeps_going(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Once upon a time")
    steps = list(infer.generate(model, prompt, 50, settings(temperature=0.0), [torch.Generator()]))
    assert len(steps) == 50  # longer than the 32-token window: the cache is refilled, decoding goes on
    tokens = [t.item() for t, _ in steps]
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens[:10]])).log_softmax(-1)  # within the window
    for i in range(10):
        expected = full[0, len(prompt) - 1 + i, tokens[i]]
        assert abs(steps[i][1].item() - expected.item()) < 1e-4


def test_no_repeat_ngram_holds_in_greedy_decoding(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("a b c")

    def repeated_bigrams(**changes):
        ids = prompt + greedy_tokens(model, tokenizer, prompt, 25, **changes)
        bigrams = list(zip(ids, ids[1:]))
        return len(bigrams) - len(set(bigrams))

    assert repeated_bigrams() > 0  # this random model loops when left alone
    assert repeated_bigrams(no_repeat_ngram_size=2) == 0


def test_num_samples_equal_separate_runs_with_consecutive_seeds(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("In the beginning")
    sampling = settings(temperature=1.0, top_k=100)

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        steps = infer.generate(model, prompt, 12, sampling, generators)
        return torch.stack([tokens for tokens, _ in steps], dim=1).tolist()  # (rows, 12)

    batched = run([5, 6, 7])
    assert batched == [run([5])[0], run([6])[0], run([7])[0]]
    assert len({tuple(row) for row in batched}) > 1  # the seeds really differ


def test_disable_eos_keeps_generating(loaded):
    model, tokenizer = loaded

    class Ones(nn.Module):  # the output head's input becomes all ones...
        def forward(self, x):
            return torch.ones_like(x)

    original_norm, original_head = model.norm, model.lm_head.weight
    prefer_eos = original_head.detach().clone()
    prefer_eos[tokenizer.eos_id] = 100.0  # ...so EOS's logit (100 x d_model) is by far the largest
    model.norm, model.lm_head.weight = Ones(), nn.Parameter(prefer_eos)
    try:
        args = infer.parse_args(["--prompt", "x", "--max-new-tokens", "6", "--seed", "0"])
        (text,), _ = infer.complete(model, None, tokenizer, tokenizer.encode("x"), args, 0, [])
        assert text == ""  # stopped at once at EOS, which is never printed
        args = infer.parse_args(["--prompt", "x", "--max-new-tokens", "6", "--seed", "0", "--disable-eos"])
        (text,), _ = infer.complete(model, None, tokenizer, tokenizer.encode("x"), args, 0, [])
        assert len(tokenizer.encode(text)) >= 3 and "<|endoftext|>" not in text
    finally:
        model.norm, model.lm_head.weight = original_norm, original_head


# --- streaming text ------------------------------------------------------------------------------


def test_stream_never_emits_half_a_character():
    tokenizer = load_tokenizer("gpt2")
    text = "héllo 😀 日本語 ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(len(ids)))  # GPT-2 does split characters
    stream = infer.TextStream(tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_stream_cuts_exactly_at_a_stop_string_and_never_shows_it():
    tokenizer = load_tokenizer("gpt2")
    ids = tokenizer.encode("one two. three END four END")
    stream = infer.TextStream(tokenizer, stops=["END", "zzz"])
    pieces = []
    for i in ids:
        pieces.append(stream.add(i))  # " E" / " EN" are held back until it is clear what they start
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text == "one two. three "  # printed text cannot be taken back


# --- command line ------------------------------------------------------------------------------


def test_cli_streams_the_same_text_as_a_non_streamed_run_and_seeds_reproduce(ckpt, loaded):
    argv = ["--ckpt", ckpt, "--prompt", "The cat", "--max-new-tokens", "20", "--seed", "3", "--top-k", "200"]
    first = run_script("infer.py", *argv)
    assert first.stdout == run_script("infer.py", *argv).stdout  # same seed, same sample
    model, tokenizer = loaded
    args = infer.parse_args([str(a) for a in argv])
    (text,), _ = infer.complete(model, None, tokenizer, tokenizer.encode("The cat"), args, 3, [])  # not streamed
    assert first.stdout == "The cat" + text + "\n"
    (other,), _ = infer.complete(model, None, tokenizer, tokenizer.encode("The cat"), args, 4, [])
    assert other != text  # another seed, another sample


def test_cli_stop_cuts_exactly(ckpt):
    argv = ["infer.py", "--ckpt", ckpt, "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "20",
            "--disable-eos"]
    full = run_script(*argv).stdout[len("Hello"):-1]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = run_script(*argv, "--stop", stop, "--stop", "never appears").stdout
    assert cut == "Hello" + full[:full.find(stop)] + "\n"


def test_cli_underscore_aliases_ppl_overflow_note_and_samples(ckpt):
    argv = ["infer.py", "--ckpt", ckpt, "--prompt", "", "--max_new_tokens", "40", "--top_p", "0.9",
            "--no_repeat_ngram_size", "3", "--repetition_penalty", "1.2", "--disable_eos", "--compute_ppl"]
    result = run_script(*argv, "--num_samples", "2", "--seed", "1")
    second = result.stdout.split("--- sample 2 (seed 2) ---\n")[1]
    assert second == run_script(*argv, "--seed", "2").stdout  # sample i = a single run with seed + i
    assert result.stderr.count("exceed the model's context") == 1  # said once, generation went on
    assert result.stdout.count("--- sample") == 2
    ppls = [float(line.rsplit(" ", 1)[1]) for line in result.stderr.splitlines() if line.startswith("perplexity")]
    assert len(ppls) == 2 and all(p > 1 for p in ppls)
    assert "[80 tokens" in result.stderr  # 2 samples x 40 tokens: EOS disabled, nothing stopped early


def test_instruction_template_only_for_fine_tuned_checkpoints(ckpt, sft_ckpt, capsys):
    def wrapped(path, *flags):
        assert infer.main(["--ckpt", str(path), "--prompt", "Name a color.", "--max-new-tokens", "2", *flags]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("Name a color.") != ("chat template on" in err)  # a base model echoes its prompt
        return "chat template on" in err

    assert wrapped(sft_ckpt) and not wrapped(ckpt)
    assert wrapped(ckpt, "--instruct") and not wrapped(sft_ckpt, "--no-wrap") and not wrapped(sft_ckpt, "--raw")


def test_interactive_chat_remembers_turns_within_the_window(sft_ckpt):
    conversation = "hello there\nwhat next?\nand then?\n/reset\nagain\n/exit\n"
    result = run_script("infer.py", "--ckpt", sft_ckpt, "--interactive", "--max-new-tokens", "4", "--seed", "0",
                        "--disable-eos", input=conversation)
    assert "chat (earlier turns are remembered)" in result.stderr
    assert "oldest turns forgotten" in result.stderr  # three turns do not fit in 32 tokens
    assert "conversation cleared" in result.stderr
    assert result.stdout.count("> ") >= 5


def test_info_only_reads_metadata_without_building_the_model(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load_model", lambda *a, **k: pytest.fail("--info-only must not load weights"))
    assert infer.main(["--ckpt", str(ckpt), "--info_only"]) == 0
    out = capsys.readouterr().out
    assert "kind: pretrain" in out and "step: 7" in out and "tokenizer: gpt2" in out


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "at least 1"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_settings_are_usage_errors(ckpt, flags, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        infer.main(["--ckpt", str(ckpt), "--prompt", "x", *flags])


def test_bad_files_are_usage_errors(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    for path, message in [(tmp_path / "missing.ckpt", "checkpoint not found"), (corrupt, "not a readable checkpoint")]:
        with pytest.raises(UsageError, match=message):
            infer.main(["--ckpt", str(path), "--prompt", "x"])


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    small_vocab = write_checkpoint(tmp_path / "small_vocab.ckpt", vocab_size=1000)  # gpt2 has 50257 tokens
    result = run_script("infer.py", "--ckpt", small_vocab, "--prompt", "x", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: tokenizer 'gpt2' has 50257 tokens but the checkpoint's model has only 1000")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- one decoder, one conditioning rule, a model shared by threads ---------------------------------


def test_decoding_never_changes_the_model_and_its_head_gives_the_same_tokens(loaded):
    """generate with infer.decode_head's copy = generate with the model's own head; mid-generation (where
    explore.py's other threads use the same model) the model's modules and weights are what they were."""
    model, tokenizer = loaded
    prompt = tokenizer.encode("The history of")
    modules, weights = dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}
    head = infer.decode_head(model)
    steps = infer.generate(model, prompt, 10, settings(temperature=0.0), [torch.Generator()], head=head)
    first = next(steps)
    assert dict(model.named_modules()) == modules  # nothing swapped in while a generation is under way
    with torch.no_grad():
        plain = model(torch.tensor([prompt]))[0, -1].argmax().item()  # another request, meanwhile
    assert first[0].item() == plain
    with_head = [first[0].item()] + [t.item() for t, _ in steps]
    assert with_head == greedy_tokens(model, tokenizer, prompt, 10)  # head made inside generate: the same
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("prompt", ["The cat", ""])
def test_infer_explore_and_evaluate_checkpoints_condition_a_prompt_alike(ckpt, loaded, prompt, monkeypatch):
    """The three scripts hand infer.generate the same ids for the same prompt: infer.start_ids' rule
    (the text's tokens; [EOS] for an empty text, which a case file cannot hold)."""
    import evaluate_checkpoints
    import explore

    model, tokenizer = loaded
    fed = {}
    real_generate = infer.generate

    def recording(script):
        def generate(model, prompt_ids, *args, **kwargs):
            fed[script] = list(prompt_ids)
            return real_generate(model, prompt_ids, *args, **kwargs)
        return generate

    monkeypatch.setattr(infer, "generate", recording("infer"))
    args = infer.parse_args(["--prompt", prompt, "--max-new-tokens", "2", "--seed", "0"])
    infer.run_once(model, None, tokenizer, args, chat=None, seed=0)

    monkeypatch.setattr(infer, "generate", recording("explore"))
    run = explore.Loaded(str(ckpt), torch.device("cpu"))
    explorer = explore.Explorer([{"name": "tiny.ckpt", "path": str(ckpt), "meta": run.meta}], 0, run, "cpu")
    list(explorer.generate({"text": prompt, "max_new_tokens": 2}))

    want = tokenizer.encode(prompt) or [tokenizer.eos_id]
    if prompt:
        monkeypatch.setattr(infer, "generate", recording("evaluate_checkpoints"))
        case = {"name": "c", "prompt": prompt, "target": " sat", "source": "-"}
        evaluate_checkpoints.score_case(model, None, tokenizer, case, 3, "cpu")
        assert fed["evaluate_checkpoints"] == want
    assert fed["infer"] == fed["explore"] == want == infer.start_ids(tokenizer, prompt)
