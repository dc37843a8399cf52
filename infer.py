"""Sample text from a checkpoint: streaming, byte-correct, with every common sampling filter.

Examples (from the repository root, after `python train.py --config config_smoke.yaml`):

    python infer.py --ckpt checkpoints/final.ckpt --prompt "Attention is"
    python infer.py --ckpt checkpoints/final.ckpt --prompt "The cat" --temperature 0        # greedy
    python infer.py --ckpt checkpoints/final.ckpt --prompt "The cat" --top-k 40 --top-p 0.9 --seed 1
    python infer.py --ckpt checkpoints/final.ckpt --prompt "The cat" --num-samples 3 --seed 7
    python infer.py --ckpt checkpoints/final.ckpt --prompt "Once" --stop "." --compute-ppl
    python infer.py --ckpt checkpoints/final.ckpt --info-only                                # metadata only
    python infer.py --ckpt checkpoints/final.ckpt --interactive                              # REPL / chat
    python infer.py --ckpt checkpoints/sft/final.ckpt --prompt "Name three colors."          # SFT: template added
    python infer.py --ckpt checkpoints/sft/final.ckpt --prompt "Name three colors." --raw    # the text as written

A checkpoint with a chat template (an imported instruct model, or one fine-tuned here: chat.py) is a chat
model: --prompt is sent as one user message through the template, --interactive is a multi-turn chat, and
a reply ends at the template's end-of-turn token.

How one token is chosen (read `process_logits`, it is the whole story):
  1. the model gives one score (logit) per vocabulary entry for the next position;
  2. the repetition penalty pushes down tokens already in the context, no-repeat-ngram bans
     tokens that would repeat an n-gram;
  3. temperature divides the scores: < 1 sharpens the distribution, > 1 flattens it;
  4. top-k keeps the k best tokens, top-p the smallest set holding probability p,
     min-p the tokens at least min_p times as likely as the best one;
  5. softmax turns the surviving scores into probabilities and one token is drawn
     (temperature 0: the best one is taken, after steps 2 and 4).
Generation runs the prompt through the model once (prefill), filling the KV cache, then feeds one
new token per step. Only torch, tokenizers and this project's model code are imported, so the
first token appears within a few seconds on a CPU.

This file is also the home of "run a trained model" for every script: `load_model` (a checkpoint ->
model), `start_ids` (how a prompt starts) and `generate` (the decoder); eval_val.py, explore.py and
evaluate_checkpoints.py use these three.
"""

import argparse
import os
import sys
import time

import torch

from checkpoint import load_checkpoint, load_weights, model_config_of, read_meta
from cli import UsageError, pick_device, reject_non_finite, run_cli
from chat import Chat, chat_template_for, instruction_chat_template
from model import KVCache, Transformer
from tokenizer import tokenizer_for_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# A trained model, and where its text starts
# ---------------------------------------------------------------------------------------------


def load_model(path: str, device="cpu", dtype=None):
    """Build the model a checkpoint describes and load its weights.

    Returns (model in eval mode, the checkpoint): ckpt["meta"] describes it, and
    tokenizer.tokenizer_for_checkpoint(ckpt) gives the tokenizer it carries.
    """
    ckpt = load_checkpoint(path)
    model_config = model_config_of(ckpt["meta"], path)
    model_config.gradient_checkpointing = False  # inference never needs it
    # Built on the CPU, not the meta device: random init is cheap, while nn.init on meta tensors imports
    # torch's compiler stack, which the first token would wait for.
    model = Transformer(model_config)
    load_weights(model, ckpt["state_dict"], path, assign=True)  # assign: use the file's (mmap'd) tensors
    if model_config.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True replaced the shared tensor: re-tie
    return model.to(device=device, dtype=dtype or torch.float32).eval(), ckpt


def start_ids(tokenizer, text: str) -> list[int]:
    """The token ids a text to continue starts from: its own tokens, or [EOS] when it is empty.

    The one conditioning rule of every script (infer.py, explore.py, evaluate_checkpoints.py): a prompt is
    continued as written, since in training text flows on across documents; an empty one starts a fresh
    document, which in training began right after an EOS.
    """
    return tokenizer.encode(text) or [tokenizer.eos_id]


# ---------------------------------------------------------------------------------------------
# Choosing the next token
# ---------------------------------------------------------------------------------------------


def process_logits(logits, generated_ids, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=1.0, no_repeat_ngram_size=0):
    """Next-token scores after every filter, in Hugging Face's order; removed tokens are -inf.

    logits: (B, V) raw scores.  generated_ids: (B, T) the tokens so far, prompt included (as in
    Hugging Face, the repetition penalty and n-gram ban look at the whole context).
    temperature 0 means greedy: no division, and the filters that cannot change the argmax
    (top-k/top-p/min-p) are harmless. Pure: the inputs are not modified.
    """
    scores = logits.float().clone()
    if repetition_penalty != 1.0:
        # Seen tokens lose likelihood whatever their sign: divide positive scores, MULTIPLY negative
        # ones (dividing a negative score would raise it, i.e. make repetition more likely).
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated_ids, True)
        penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    n = no_repeat_ngram_size
    if n > 0 and generated_ids.shape[1] >= n:
        # Every earlier n-gram whose first n-1 tokens equal the last n-1 tokens bans its last token.
        ngrams = generated_ids.unfold(1, n, 1)  # (B, T-n+1, n): all n-grams so far
        prefix = generated_ids[:, generated_ids.shape[1] - n + 1:]  # (B, n-1)
        matches = (ngrams[:, :, :-1] == prefix[:, None, :]).all(-1)  # (B, T-n+1)
        hits = torch.zeros_like(scores).scatter_add_(1, ngrams[:, :, -1], matches.float())
        scores = scores.masked_fill(hits > 0, float("-inf"))
    if temperature > 0:
        scores = scores / temperature
    if top_k > 0:
        kth_best = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth_best, float("-inf"))  # ties with the k-th survive
    if top_p < 1.0:
        # Sort ascending; drop the least likely tokens while their total mass stays <= 1 - top_p.
        # The best token is always kept. Only tokens still alive need sorting (after top-k: k of
        # them, much cheaper than sorting the whole vocabulary); the others are -inf already.
        alive = int(torch.isfinite(scores).sum(-1).max())
        sorted_scores, order = (t.flip(-1) for t in torch.topk(scores, alive))  # ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, drop_sorted)  # vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(-1)
        too_unlikely = probs < min_p * probs.amax(-1, keepdim=True)
        scores = scores.masked_fill(too_unlikely, float("-inf"))  # the best token never is
    return scores


def choose_tokens(scores, temperature, generators):
    """One token per row: argmax when temperature is 0, else a draw from softmax(scores) with the row's generator."""
    if temperature == 0:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def decode_head(model):
    """The head generate decodes with: model.transposed_head() on a CPU (faster there, see it), else None.

    A copy outside the model, made once per loaded model by whoever keeps the model (infer.main,
    explore.Loaded) and passed to every generate call: the shared model itself is never changed.
    """
    return model.transposed_head() if next(model.parameters()).device.type == "cpu" else None


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, sampling, generators, banned_ids=(), head=None):
    """Yield (tokens, logprobs) per step: the next token of each row and its log-probability under the model.

    One row per generator: all rows continue the same prompt from ONE batched prefill, and row i
    uses only generators[i], so it equals a single-row run seeded like generators[i].
    sampling: dict of process_logits' keyword arguments. banned_ids are never chosen.
    head: decode_head(model), made once by the caller; left out, it is made for this call.
    When the context window fills up, the most recent 3/4 of it is run through the model again
    (positions are relative under RoPE, so the text just continues) and decoding goes on.
    """
    config = model.config
    param = next(model.parameters())
    rows = len(generators)
    ids = torch.tensor(prompt_ids, device=param.device).repeat(rows, 1)  # (rows, T) the whole text so far
    keep = config.max_seq_len - config.max_seq_len // 4  # tokens kept when the window is full
    cache = KVCache(config, rows, param.device, param.dtype)
    if head is None:
        head = decode_head(model)
    for step in range(max_new_tokens):
        if step == 0 or cache.length == config.max_seq_len:
            cache.length = 0  # (re)fill the cache from the most recent tokens in one forward
            context = ids if ids.shape[1] < config.max_seq_len else ids[:, -keep:]
            logits = model(context, cache, last_only=True, head_t=head)[:, -1]
        else:
            logits = model(ids[:, -1:], cache, head_t=head)[:, -1]  # the newest token only: the cache holds the rest
        logits = logits.float()  # (rows, vocab_size)
        logprobs = logits.log_softmax(-1)
        if banned_ids:
            logits[:, list(banned_ids)] = float("-inf")
        scores = process_logits(logits, ids, **sampling)
        tokens = choose_tokens(scores, sampling["temperature"], generators)  # (rows,)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        yield tokens, logprobs.gather(1, tokens[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# Tokens -> text, as they arrive
# ---------------------------------------------------------------------------------------------


class TextStream:
    """Turn token ids into printable text one token at a time.

    A character can span several tokens (GPT-2 splits an emoji into byte tokens): while the text
    decoded so far ends in U+FFFD (an unfinished character) that tail is held back. Text that could
    be the start of a stop string is held back too, and the stop string itself is never emitted.
    The whole sequence is decoded each time (not token by token), so tokenizers that merge
    neighbours when decoding (SentencePiece spaces) come out right.
    """

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids, self.text, self.sent, self.stopped = [], "", 0, False

    def add(self, token_id: int) -> str:
        """Take one token; return the new text that is safe to print (often "")."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        found = [self.text.find(s) for s in self.stops if s in self.text]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
            return self.finish()
        safe = len(self.text.rstrip("\ufffd"))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text[:safe].endswith(s[:k])), default=0)
        return self._emit(safe - held)

    def finish(self) -> str:
        """Whatever is still held back (the text is complete now)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring's examples as written, and each flag's default."""

    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Every --dashed-flag also accepts its --underscore_spelling (e.g. --max_new_tokens).",
        formatter_class=Formatter)
    p.add_argument("--ckpt", default="checkpoints/final.ckpt", help="checkpoint file (.ckpt)")
    p.add_argument("--tokenizer", default="auto",
                   help="auto = the copy the checkpoint carries; or gpt2, a local folder, a Hub name (it must be the "
                        "tokenizer the checkpoint was trained with)")
    p.add_argument("--force-tokenizer", "--force_tokenizer", action="store_true",
                   help="use --tokenizer even though it is not the one the checkpoint was trained with")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and activations")
    p.add_argument("--prompt", default=None,
                   help="text to continue (empty = start a fresh document). Required unless --interactive or --info-only")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (always the most likely token)")
    p.add_argument("--top-k", "--top_k", type=int, default=50, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", "--top_p", type=float, default=0.95,
                   help="keep the fewest tokens whose probabilities sum to p, in (0, 1] (1 = off)")
    p.add_argument("--min-p", "--min_p", type=float, default=0.0,
                   help="drop tokens less likely than min_p x the best token's probability (0 = off)")
    p.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the text less likely (1 = off)")
    p.add_argument("--no-repeat-ngram-size", "--no_repeat_ngram_size", type=int, default=0,
                   help="never repeat an n-gram of this size, greedy included (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when this text appears, and cut it off (repeatable)")
    p.add_argument("--num-samples", "--num_samples", type=int, default=1,
                   help="N continuations from one batched prefill; sample i equals a run with --seed SEED+i "
                        "(printed at the end rather than streamed when N > 1)")
    p.add_argument("--disable-eos", "--disable_eos", action="store_true",
                   help="never produce the end-of-text token: always generate --max-new-tokens tokens")
    p.add_argument("--compute-ppl", "--compute_ppl", action="store_true",
                   help="report the perplexity of the generated tokens given the prompt, under the model's "
                        "own (unfiltered) distribution")
    p.add_argument("--print-ckpt-info", "--print_ckpt_info", action="store_true",
                   help="print the checkpoint's metadata before generating")
    p.add_argument("--info-only", "--info_only", action="store_true",
                   help="print the checkpoint's metadata and exit (reads the .json sidecar; no model is built)")
    # Two flags, one setting: left out, it follows the checkpoint (args.instruct None). SUPPRESS keeps
    # --help from printing each flag's own default (`--raw (default: True)`), which is not what happens.
    wrap = p.add_mutually_exclusive_group()
    wrap.add_argument("--instruct", dest="instruct", action="store_true", default=argparse.SUPPRESS,
                      help="wrap the prompt in the chat template (default: automatic, on for fine-tuned (SFT) "
                           "checkpoints and models that carry a chat template, off for base ones; a base model "
                           "without a template gets the instruction template)")
    wrap.add_argument("--raw", "--no-wrap", "--no_wrap", dest="instruct", action="store_false",
                      default=argparse.SUPPRESS,
                      help="use the prompt as written, even for a chat model (default: automatic, see --instruct)")
    p.add_argument("--interactive", action="store_true",
                   help="REPL: a multi-turn chat for chat models, prompt continuation for base ones; "
                        "/reset clears, /exit or Ctrl-D leaves")
    p.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation (chat models)")
    return p.parse_args(argv, argparse.Namespace(instruct=None))  # None: automatic, by the checkpoint


def check_args(args) -> None:
    """Reject impossible settings before loading anything."""
    reject_non_finite(args)
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if not 0 <= args.min_p <= 1:
        raise UsageError(f"--min-p must be in [0, 1] (0 = off), got {args.min_p}")
    if args.top_k < 0 or args.no_repeat_ngram_size < 0:
        raise UsageError("--top-k and --no-repeat-ngram-size must be >= 0 (0 = off)")
    if not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be positive (1 = off), got {args.repetition_penalty}")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UsageError("--max-new-tokens and --num-samples must be at least 1")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.prompt is None and not (args.interactive or args.info_only):
        raise UsageError("pass --prompt TEXT (or --interactive for a REPL, --info-only for metadata)")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16 support: use --dtype fp16 or fp32")
    return DTYPES[name]


def describe(meta: dict) -> str:
    """The checkpoint's metadata as a few readable lines."""
    def number(key):
        value = meta.get(key)
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    mc = meta.get("model_config", {})
    lines = [f"kind: {meta.get('kind')}   step: {meta.get('step')}   epoch: {number('epoch')}   "
             f"tokens seen: {meta.get('tokens_seen')}",
             f"train loss: {number('train_loss')}   val loss: {number('val_loss')}   parameters: {meta.get('n_params')}",
             "model: " + ", ".join(f"{k}={v}" for k, v in mc.items()),
             f"tokenizer: {meta.get('tokenizer')}"]
    return "\n".join(lines)


def sampling_settings(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size}


def complete(model, head, tokenizer, prompt_ids, args, seed, stops, stream_to=None, end_ids=None):
    """Generate args.num_samples continuations of prompt_ids; returns (texts, ppls).

    head: decode_head(model). With stream_to (a file), the single sample is written there piece by piece.
    A row finishes at a token of end_ids (default: the end-of-text token; a chat model's Chat.stop_ids),
    which is never shown, at a stop string, or after --max-new-tokens tokens.
    """
    end_ids = end_ids or {tokenizer.eos_id}
    rows = args.num_samples
    device = next(model.parameters()).device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(rows)]
    streams = [TextStream(tokenizer, stops) for _ in range(rows)]
    nll = [0.0] * rows  # each row's summed NLL of its generated tokens
    counts = [0] * rows  # tokens generated per row
    done = [False] * rows
    banned = sorted(end_ids) if args.disable_eos else []
    started = time.perf_counter()
    steps = generate(model, prompt_ids, args.max_new_tokens, sampling_settings(args), generators, banned, head)
    for tokens, logprobs in steps:
        for i, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
            if done[i]:
                continue
            nll[i] -= logprob
            counts[i] += 1
            if token in end_ids:
                done[i] = True
                continue
            piece = streams[i].add(token)
            if stream_to is not None and piece:
                stream_to.write(piece)
                stream_to.flush()
            done[i] = streams[i].stopped
        if all(done):
            break
    for stream in streams:
        piece = stream.finish()
        if stream_to is not None and piece:
            stream_to.write(piece)
            stream_to.flush()
    seconds = time.perf_counter() - started
    print(f"\n[{sum(counts)} tokens in {seconds:.2f} s, {sum(counts) / seconds:.1f} tokens/s]", file=sys.stderr)
    ppls = [float(torch.tensor(n / max(c, 1)).exp()) for n, c in zip(nll, counts)]
    return [s.text for s in streams], ppls


def context_note(prompt_len: int, args, max_seq_len: int) -> None:
    if prompt_len + args.max_new_tokens > max_seq_len:
        print(f"note: prompt ({prompt_len} tokens) + {args.max_new_tokens} new tokens exceed the model's context "
              f"of {max_seq_len}; the most recent tokens are kept", file=sys.stderr)


def opening(args) -> list[dict]:
    """The messages a conversation starts with: the --system message, if any."""
    return [{"role": "system", "content": args.system}] if args.system else []


def run_once(model, head, tokenizer, args, chat: Chat | None, seed: int) -> int:
    """One prompt: continued as written, or (a chat model) sent as one user message through its template."""
    if chat:
        prompt_ids, _ = chat.encode(opening(args) + [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt_ids = start_ids(tokenizer, args.prompt)
    context_note(len(prompt_ids), args, model.config.max_seq_len)
    stops, end_ids = (args.stop + chat.stops, chat.stop_ids) if chat else (args.stop, None)
    stream = args.num_samples == 1
    if stream and not chat:
        sys.stdout.write(args.prompt)  # a base model continues the text: show it whole
        sys.stdout.flush()
    texts, ppls = complete(model, head, tokenizer, prompt_ids, args, seed, stops, sys.stdout if stream else None,
                           end_ids)
    if not stream:
        for i, completion in enumerate(texts):
            print(f"--- sample {i + 1} (seed {seed + i}) ---")
            print(completion if chat else args.prompt + completion)
    else:
        print()
    if args.compute_ppl:
        for i, ppl in enumerate(ppls):
            print(f"perplexity of the generated tokens (sample {i + 1}): {ppl:.3f}", file=sys.stderr)
    return 0


def chat_loop(model, head, tokenizer, args, chat: Chat | None, seed: int) -> int:
    """REPL. A chat model keeps the conversation (dropping the oldest exchanges when the context fills);
    a base model continues each line on its own."""
    if args.num_samples != 1:
        raise UsageError("--interactive shows one reply per turn: drop --num-samples")
    kind = "chat (earlier turns are remembered)" if chat else "prompt continuation (each line is a new prompt)"
    print(f"{kind}: /reset clears, /exit or Ctrl-D leaves", file=sys.stderr)
    max_len = model.config.max_seq_len
    messages = opening(args)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = opening(args)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if not chat:
            prompt_ids = start_ids(tokenizer, line)
            context_note(len(prompt_ids), args, max_len)
            sys.stdout.write(line)
            complete(model, head, tokenizer, prompt_ids, args, seed, args.stop, sys.stdout)
            print()
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids, _ = chat.encode(messages, add_generation_prompt=True)
        first = len(opening(args))  # the system message stays
        dropped = False
        while len(messages) > first + 1 and len(prompt_ids) + args.max_new_tokens > max_len:
            del messages[first:first + 2]  # forget the oldest exchange (user, assistant) so the reply fits
            prompt_ids, _ = chat.encode(messages, add_generation_prompt=True)
            dropped = True
        if dropped:
            print("(oldest turns forgotten to stay within the context window)", file=sys.stderr)
        context_note(len(prompt_ids), args, max_len)
        (reply,), _ = complete(model, head, tokenizer, prompt_ids, args, seed, args.stop + chat.stops, sys.stdout,
                               chat.stop_ids)
        print()
        messages.append({"role": "assistant", "content": reply})


def chat_for(meta: dict, tokenizer, instruct: bool | None) -> tuple[Chat | None, str]:
    """The Chat a run prompts through (None: prompts as written), and the line that says so.

    instruct: --instruct (True), --raw (False) or automatic (None: the checkpoint's own template, if any).
    """
    template = chat_template_for(meta)
    if instruct is False or (template is None and not instruct):
        why = "chat template off (--raw)" if template else ""
        return None, why
    if template is None:
        return Chat(instruction_chat_template(), tokenizer), "chat template on (the instruction template, --instruct)"
    whose = "the model's own" if meta.get("chat_template") else "the instruction template it was fine-tuned on"
    return Chat(template, tokenizer), f"chat template on ({whose}): --prompt is a user message; --raw for plain text"


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    if args.info_only:
        print(describe(read_meta(args.ckpt)))
        return 0
    device = pick_device(args.device, strict=True)
    model, ckpt = load_model(args.ckpt, device, pick_dtype(args.dtype, device))
    meta = ckpt["meta"]
    tokenizer = tokenizer_for_checkpoint(ckpt, args.tokenizer, force=args.force_tokenizer)
    if args.print_ckpt_info:
        print(describe(meta))
    chat, chat_line = chat_for(meta, tokenizer, args.instruct)
    if args.system and not chat:
        raise UsageError("--system needs a chat model: this checkpoint has no chat template (add --instruct to use "
                         "the instruction template, or leave out --raw)")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    print(f"{meta.get('kind')} checkpoint, step {meta.get('step')}, {meta.get('n_params')} parameters, "
          f"{device.type} {args.dtype}, tokenizer {tokenizer.spec}, seed {seed}", file=sys.stderr)
    if chat_line:
        print(chat_line, file=sys.stderr)
    head = decode_head(model)  # once: every turn of --interactive decodes with it
    if args.interactive:
        return chat_loop(model, head, tokenizer, args, chat, seed)
    return run_once(model, head, tokenizer, args, chat, seed)


if __name__ == "__main__":
    run_cli(main)
