"""See inside a checkpoint in your browser: next-token odds, what each sampling filter does, attention, surprise.

Examples (from the repository root, after `python train.py --config config_smoke.yaml`):

    python explore.py --ckpt checkpoints/final.ckpt                  # prints http://127.0.0.1:8765/ : open it
    python explore.py --ckpt checkpoints/sft/final.ckpt --port 8800  # an SFT checkpoint: the Chat panel answers
    python explore.py --ckpt checkpoints/final.ckpt --port 0         # any free port (the printed line says which)
    python explore.py --ckpt checkpoints/final.ckpt --host 0.0.0.0   # reachable from other machines: read the warning

The page (explore_page/: one HTML, one CSS and one JavaScript file, nothing downloaded) has five panels:
  1. Next token: the most likely next tokens as bars, after each stage of `infer.process_logits` in its
     real order (repetition penalty -> temperature -> top-k -> top-p -> min-p), with a slider for each;
     filtered tokens greyed, the mass each filter kept and the entropy printed. Click a bar to append
     that token, or step greedily, sample (seeded), or generate N tokens as they stream.
  2. Tokens and surprise: the tokenizer's pieces, ids and bytes, each token coloured by its loss under
     the model, and the text's bits per byte, scored by `eval_val.evaluate` exactly as eval_val.py
     scores a held-out document, in one forward (the first token has no context; the end of the text
     is scored as EOS).
  3. Attention: any layer's and head's weights as a query x key heat map, recorded by the model itself
     (`model.Attention.record_weights`); the causal mask and a sliding window show as the exact zeros they are.
  4. The run: the checkpoint's facts, the run's loss curve (metrics.csv, read by `plots.read_losses`),
     and the next-token bars of two checkpoints of the same folder side by side.
  5. Chat: a conversation through the checkpoint's chat template (chat.py, as infer.py --interactive sends
     it; the instruction template for a checkpoint without one), each reply streamed token by token.
     Panel 1 can wrap its text the same way ("chat" in the request) to show what the model really reads.
Every number comes from this project's Python code; the page only draws.

Server: the standard library's ThreadingHTTPServer (one local user needs nothing more), one lock around
the model so that concurrent requests are safe. It serves its three page files and a JSON API, nothing
else: a request names a checkpoint by its index or file name in the list made at start-up (the .ckpt
files beside --ckpt), never by a path. A bad request gets HTTP 400 and {"error": "one line"}.

    GET  /api/info       the checkpoints, their facts, the run's loss curve, the settings' ranges
    POST /api/next       {ckpt, text | ids, chat, settings, seed, top}  next-token bars after each stage
    POST /api/tokens     {ckpt, text | ids, chat}                       pieces, bytes, surprise, bits per byte
    POST /api/attention  {ckpt, text | ids, chat, layer, head}          (T, T) attention weights
    POST /api/generate   {ckpt, text | ids | messages | instruction, settings, seed, max_new_tokens}
                         one JSON object per line as tokens are generated, then {"done": ...}
"chat": true sends the text as one user message through the chat template; "messages" is a whole
conversation ([{role, content}, ...], ending with a user turn), "instruction" one user message.
"""

import argparse
import errno
import glob
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch
from tokenizers import decoders

import infer
from chat import Chat, chat_template_for, check_messages, instruction_chat_template
from checkpoint import read_meta
from cli import UsageError, pick_device, run_cli
from eval_val import evaluate
from plots import read_losses
from tokenizer import tokenizer_for_checkpoint

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore_page")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),  # URL path -> file in PAGE_DIR: nothing else is served
              "/explore.css": ("explore.css", "text/css; charset=utf-8"),
              "/explore.js": ("explore.js", "text/javascript; charset=utf-8")}
MAX_BODY = 64 * 1024  # bytes of one request: a prompt of max_seq_len tokens fits many times over
MAX_NEW_TOKENS = 500  # most tokens one /api/generate may ask for
LOADED_MODELS = 3  # checkpoints kept in memory at once (the one from --ckpt is never dropped)
# The sampling settings the API accepts (infer.process_logits' arguments) and their ranges; the page builds
# its sliders from this table. "off" is each one's neutral value: the page starts with every filter off.
SETTINGS = {
    "repetition_penalty": {"low": 0.5, "high": 3.0, "step": 0.05, "off": 1.0},
    "temperature": {"low": 0.0, "high": 3.0, "step": 0.05, "off": 1.0},  # 0 = greedy
    "top_k": {"low": 0, "high": 200, "step": 1, "off": 0},
    "top_p": {"low": 0.01, "high": 1.0, "step": 0.01, "off": 1.0},
    "min_p": {"low": 0.0, "high": 1.0, "step": 0.01, "off": 0.0},
}
# process_logits' stages in the order it applies them, and the setting each one uses.
STAGES = [("repetition", "repetition_penalty"), ("temperature", "temperature"), ("top-k", "top_k"),
          ("top-p", "top_p"), ("min-p", "min_p")]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class Loaded:
    """One checkpoint in memory: the model, its decoding head (infer.decode_head), its metadata, tokenizer and
    chat template (its own, else the instruction template: a base model can be asked too, and shows why SFT is needed).

    Request threads share it and only read it: generation never changes the model.
    """

    def __init__(self, path: str, device):
        # The only place explore.py loads a model: with what every other script uses, in the same way.
        self.model, ckpt = infer.load_model(path, device)
        self.head = infer.decode_head(self.model)
        self.meta = ckpt["meta"]
        self.tokenizer = tokenizer_for_checkpoint(ckpt)
        self.chat = Chat(chat_template_for(self.meta) or instruction_chat_template(), self.tokenizer)
        self.device = device


def list_checkpoints(main_path: str) -> list[dict]:
    """The .ckpt files in main_path's folder (read at start-up, metadata only), ordered by training step.

    A file whose metadata cannot be read is left out with a warning: it must not stop the explorer.
    """
    main_path = os.path.abspath(main_path)
    entries = []
    paths = glob.glob(os.path.join(glob.escape(os.path.dirname(main_path)), "*.ckpt"))
    for path in paths + ([main_path] if main_path not in paths else []):
        try:
            meta = read_meta(path)
        except UsageError as e:
            print(f"warning: {os.path.basename(path)} is left out of the checkpoint list: {e}", file=sys.stderr)
            continue
        entries.append({"name": os.path.basename(path), "path": path, "meta": meta})
    entries.sort(key=lambda e: (e["meta"].get("step") or 0, e["name"]))
    return entries


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for. Byte-level BPE (GPT-2's) spells each byte as one printable
    character, so the token's own string maps back to its exact bytes, even half of a character;
    other tokenizers: the UTF-8 of the token decoded alone."""
    piece = tokenizer.backend.id_to_token(token_id)
    if isinstance(tokenizer.backend.decoder, decoders.ByteLevel) and piece and all(c in BYTE_OF_CHAR for c in piece):
        return bytes(BYTE_OF_CHAR[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def _byte_level_alphabet() -> dict:
    """character -> byte of GPT-2's byte-level alphabet: printable bytes stand for themselves, the other
    68 (controls, space, ...) are moved, in order, to the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    moved = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(moved)}}


BYTE_OF_CHAR = _byte_level_alphabet()


# ---------------------------------------------------------------------------------------------
# What the page asks for
# ---------------------------------------------------------------------------------------------


class Explorer:
    """The API's answers. Every method takes the request's JSON object and returns a JSON-ready dict;
    a bad request raises UsageError (the server turns it into HTTP 400). One lock serialises all model
    work: requests may come from several threads at once."""

    def __init__(self, checkpoints: list[dict], main: int, main_loaded: Loaded, device):
        self.checkpoints, self.main, self.device = checkpoints, main, device
        self.loaded = OrderedDict({main: main_loaded})  # index -> Loaded, least recently used first
        self.lock = threading.Lock()
        self.logits_cache = OrderedDict()  # (ckpt, ids) -> next-token logits: moving a slider only re-filters
        self.attention_cache = None  # (ckpt, ids, [weights of each layer])
        folder = os.path.dirname(checkpoints[main]["path"])
        metrics = os.path.join(folder, "metrics.csv")
        self.losses = read_losses(metrics) if os.path.isfile(metrics) else None

    # -- requests -------------------------------------------------------------------------------

    def info(self) -> dict:
        losses = None
        if self.losses is not None:
            train, val = self.losses
            losses = {"train": sorted(train.items()), "val": sorted(val.items())}
        return {"main": self.main, "settings": SETTINGS, "max_new_tokens": MAX_NEW_TOKENS, "losses": losses,
                "checkpoints": [{"index": i, "name": c["name"], **{k: c["meta"].get(k) for k in (
                    "kind", "step", "epoch", "tokens_seen", "train_loss", "val_loss", "n_params", "model_config",
                    "tokenizer", "config")}, "chat_template": chat_template_for(c["meta"]) is not None}
                    for i, c in enumerate(self.checkpoints)]}

    def next_token(self, body: dict) -> dict:
        """The top tokens after each stage of process_logits, the greedy choice and a seeded sample."""
        check_keys(body, "ckpt", "text", "ids", "chat", "settings", "seed", "top")
        settings = check_settings(body.get("settings", {}))
        seed = integer(body, "seed", 0, 0, 2**31 - 1)
        top = integer(body, "top", 20, 1, 100)
        with self.lock:
            index, loaded = self.checkpoint(body)
            ids = prompt_ids(body, loaded)
            stages = filter_stages(self.next_logits(index, loaded, ids), ids, settings)
            final = stages[-1][1][None]  # (1, vocab): what infer.py samples from
            generator = torch.Generator().manual_seed(seed)
            sampled = int(infer.choose_tokens(final, settings["temperature"], [generator])[0])
            greedy = int(infer.choose_tokens(final, 0, [generator])[0])
            probs = torch.stack([stage_scores.softmax(-1) for _, stage_scores in stages])  # (stages, vocab)
            return {"ids": ids, "text": loaded.tokenizer.decode(ids), "stages": stage_summaries(stages, probs),
                    "tokens": top_tokens(stages, probs, loaded.tokenizer, top, [greedy, sampled]),
                    "greedy": greedy, "sampled": sampled, "seed": seed, "temperature": settings["temperature"]}

    def tokens(self, body: dict) -> dict:
        """How the text splits into tokens, and how surprised the model is by each (eval_val.py's scoring)."""
        check_keys(body, "ckpt", "text", "ids", "chat")
        with self.lock:
            _, loaded = self.checkpoint(body)
            ids, tokenizer = prompt_ids(body, loaded), loaded.tokenizer
            # The text as one held-out document, scored as eval_val.py scores one: inputs = the tokens,
            # targets = the same shifted by one and closed by EOS. One forward gives the totals (bits per
            # byte included) and the per-token losses behind the colours.
            x, y = torch.tensor(ids), torch.tensor(ids[1:] + [tokenizer.eos_id])
            totals = evaluate(loaded.model, [(x, y)], tokenizer, batch_size=1, device=loaded.device, token_nll=True)
            nll = totals["token_nll"]  # nats, one per target

        def surprise(loss):
            return {"nll": loss, "bits": loss / math.log(2), "p": math.exp(-loss)}

        pieces = [{"id": t, "piece": tokenizer.decode([t]), "bytes": token_bytes(tokenizer, t).hex(" "),
                   **(surprise(nll[i - 1]) if i else {"nll": None})} for i, t in enumerate(ids)]
        end = {"id": tokenizer.eos_id, "piece": tokenizer.decode([tokenizer.eos_id]), **surprise(nll[-1])}
        return {"ids": ids, "text": tokenizer.decode(ids), "tokens": pieces, "end": end,
                "scored": totals["tokens"], "bytes": totals["bytes"], "bits": totals["nll_sum"] / math.log(2),
                "loss": totals["val_loss"], "ppl": totals["val_ppl"], "bpb": totals["val_bpb"]}

    def attention(self, body: dict) -> dict:
        """One layer's and head's attention weights for the text: (T, T), row = query, column = key."""
        check_keys(body, "ckpt", "text", "ids", "chat", "layer", "head")
        with self.lock:
            index, loaded = self.checkpoint(body)
            config = loaded.model.config
            layer = integer(body, "layer", 0, 0, config.n_layers - 1)
            head = integer(body, "head", 0, 0, config.n_heads - 1)
            ids = prompt_ids(body, loaded)
            if self.attention_cache is None or self.attention_cache[:2] != (index, ids):
                self.attention_cache = (index, ids, record_attention(loaded.model, ids, loaded.device))
            weights = self.attention_cache[2][layer][head]  # (T, T)
        return {"ids": ids, "pieces": [loaded.tokenizer.decode([t]) for t in ids], "layer": layer, "head": head,
                "kv_head": head // (config.n_heads // config.n_kv_heads), "n_layers": config.n_layers,
                "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "swa_window": config.swa_window,
                "weights": weights.tolist()}

    def generate(self, body: dict):
        """Check the request, then return an iterator of JSON objects: one per token, then {"done": ...}.

        The loop is infer.py's own (infer.generate, infer.TextStream); the lock is taken per token, so
        other requests are answered while a long generation streams.
        """
        check_keys(body, "ckpt", "text", "ids", "messages", "instruction", "settings", "seed", "max_new_tokens")
        settings = check_settings(body.get("settings", {}))
        seed = integer(body, "seed", 0, 0, 2**31 - 1)
        max_new_tokens = integer(body, "max_new_tokens", 50, 1, MAX_NEW_TOKENS)
        with self.lock:
            _, loaded = self.checkpoint(body)
            chatting = "messages" in body or "instruction" in body
            if chatting:
                ids = conversation_ids(body, loaded)
            else:
                ids = prompt_ids(body, loaded)
        stops, end_ids = (loaded.chat.stops, loaded.chat.stop_ids) if chatting else ([], {loaded.tokenizer.eos_id})
        sampling = {**{k: v["off"] for k, v in SETTINGS.items()}, **settings, "no_repeat_ngram_size": 0}
        steps = infer.generate(loaded.model, ids, max_new_tokens, sampling, [torch.Generator(loaded.device).manual_seed(seed)],
                               head=loaded.head)

        def lines():
            stream = infer.TextStream(loaded.tokenizer, stops)
            started = time.perf_counter()
            count = 0
            reason = "length"
            while True:
                with self.lock:
                    step = next(steps, None)
                if step is None:
                    break
                token, count = int(step[0][0]), count + 1
                if token in end_ids:  # the end-of-text token, or a chat model's end of turn: never shown
                    reason = "eos"
                    break
                yield {"id": token, "text": stream.add(token)}
                if stream.stopped:
                    reason = "stop"
                    break
            yield {"done": True, "reason": reason, "text": stream.finish(), "tokens": count,
                   "seconds": round(time.perf_counter() - started, 3)}

        return lines()

    # -- helpers that need the explorer's state -------------------------------------------------

    def checkpoint(self, body: dict):
        """(index, Loaded) of the checkpoint a request names by index or file name (default: --ckpt's)."""
        ref = body.get("ckpt", self.main)
        names = [c["name"] for c in self.checkpoints]
        if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(names):
            index = ref
        elif isinstance(ref, str) and ref in names:
            index = names.index(ref)
        else:
            raise UsageError(f"unknown checkpoint {ref!r}: name one of the {len(names)} that /api/info lists "
                             "(by index or file name)")
        if index not in self.loaded:
            self.loaded[index] = Loaded(self.checkpoints[index]["path"], self.device)
            while len(self.loaded) > LOADED_MODELS:  # drop the least recently used (never --ckpt's)
                oldest = next(i for i in self.loaded if i != self.main)
                del self.loaded[oldest]
        self.loaded.move_to_end(index)
        return index, self.loaded[index]

    @torch.inference_mode()
    def next_logits(self, index: int, loaded: Loaded, ids: list[int]) -> torch.Tensor:
        """The model's next-token scores after ids, (vocab_size,) in fp32; cached, so a slider only re-filters."""
        key = (index, tuple(ids))
        if key not in self.logits_cache:
            logits = loaded.model(torch.tensor([ids], device=loaded.device), last_only=True)[0, -1]  # (vocab_size,)
            self.logits_cache[key] = logits.float().cpu()
            if len(self.logits_cache) > 32:
                self.logits_cache.popitem(last=False)
        self.logits_cache.move_to_end(key)
        return self.logits_cache[key]


@torch.inference_mode()
def record_attention(model, ids: list[int], device) -> list[torch.Tensor]:
    """Each layer's attention weights for one text, (n_heads, T, T) per layer, as the model itself applied them."""
    for block in model.blocks:
        block.attn.record_weights = True
    try:
        model(torch.tensor([ids], device=device), last_only=True)
        return [block.attn.weights[0].cpu() for block in model.blocks]
    finally:
        for block in model.blocks:
            block.attn.record_weights, block.attn.weights = False, None


def filter_stages(logits, ids: list[int], settings: dict) -> list[tuple[str, torch.Tensor]]:
    """[(stage, scores (vocab,))]: the model's logits, then the scores after each filter of process_logits.

    process_logits itself does every step, one filter per call, each call on the previous one's scores:
    the same operations in the same order as a single call with every setting, so the last stage is
    exactly what infer.py samples from (tests/test_explore.py checks it).
    """
    scores, context, stages = logits[None], torch.tensor([ids]), [("model", logits)]
    for name, key in STAGES:
        scores = infer.process_logits(scores, context, **{key: settings[key]})
        stages.append((name, scores[0]))
    return stages


def stage_summaries(stages, probs) -> list[dict]:
    """Per stage: tokens still allowed, the share of the previous stage's probability they hold, entropy (bits)."""
    alive = torch.stack([torch.isfinite(scores) for _, scores in stages])  # (stages, vocab)
    kept = [1.0] + (probs[:-1] * alive[1:]).sum(-1).tolist()
    entropy = (torch.special.entr(probs).sum(-1) / math.log(2)).tolist()  # entr(0) = 0: filtered tokens add nothing
    return [{"stage": name, "alive": n, "kept": k, "entropy_bits": h}
            for (name, _), n, k, h in zip(stages, alive.sum(-1).tolist(), kept, entropy)]


def top_tokens(stages, probs, tokenizer, top: int, always=()) -> list[dict]:
    """The `top` tokens the filters rank (after the repetition penalty), plus any id in `always`.

    Each: its probability after every stage (0 once filtered) and the stage that removed it, if any.
    """
    ranking = stages[1][1]  # temperature does not change the order; the filters cut this ranking
    chosen = torch.topk(ranking, top).indices.tolist()
    chosen += [t for t in dict.fromkeys(always) if t not in chosen]
    p = probs[:, chosen].T.tolist()  # (tokens, stages)
    removed = torch.stack([torch.isinf(scores[chosen]) for _, scores in stages]).T.tolist()
    names = [name for name, _ in stages]
    return [{"id": t, "piece": tokenizer.decode([t]), "p": p[i],
             "removed_by": next((n for n, gone in zip(names, removed[i]) if gone), None)}
            for i, t in enumerate(chosen)]


# ---------------------------------------------------------------------------------------------
# Checking requests (each failure is one line for an HTTP 400)
# ---------------------------------------------------------------------------------------------


def check_keys(body: dict, *allowed: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise UsageError(f"unknown field(s) {', '.join(unknown)}: this endpoint takes {', '.join(allowed)}")


def integer(body: dict, key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UsageError(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_settings(settings) -> dict:
    """Sampling settings within SETTINGS' ranges; missing ones are off."""
    if not isinstance(settings, dict):
        raise UsageError(f"settings must be an object such as {{\"temperature\": 0.8}}, got {settings!r}")
    check_keys(settings, *SETTINGS)
    out = {}
    for key, rule in SETTINGS.items():
        value = settings.get(key, rule["off"])
        whole = isinstance(rule["step"], int)  # an integer step: an integer setting (top_k)
        if (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
                or not rule["low"] <= value <= rule["high"]):
            kind = "an integer" if whole else "a number"
            raise UsageError(f"settings.{key} must be {kind} from {rule['low']} to {rule['high']}, got {value!r}")
        out[key] = value
    if 0 < out["temperature"] < 0.01:
        raise UsageError(f"settings.temperature must be 0 (greedy) or at least 0.01, got {out['temperature']!r}")
    return out


def conversation_ids(body: dict, loaded: Loaded) -> list[int]:
    """The prompt of a chat request: its messages (or its one instruction) through the checkpoint's template,
    as infer.py --interactive encodes them, checked against the context window."""
    if "text" in body or "ids" in body or ("messages" in body and "instruction" in body):
        raise UsageError("give messages, an instruction, or text/ids to continue: only one of them")
    if "instruction" in body:
        if not isinstance(body["instruction"], str) or not body["instruction"].strip():
            raise UsageError("instruction must be a non-empty string")
        messages = [{"role": "user", "content": body["instruction"]}]
    else:
        messages = check_messages(body["messages"])
        if messages[-1]["role"] != "user":
            raise UsageError("the last message must be the user's: the model answers it")
    ids, _ = loaded.chat.encode(messages, add_generation_prompt=True)
    return within_context(ids, loaded)


def within_context(ids: list[int], loaded: Loaded) -> list[int]:
    limit = loaded.model.config.max_seq_len
    if len(ids) > limit:
        raise UsageError(f"the text is {len(ids)} tokens long, longer than the model's context of {limit}: shorten it")
    return ids


def prompt_ids(body: dict, loaded: Loaded) -> list[int]:
    """The request's text (tokenized) or token ids, checked against the vocabulary and the context window.
    A text starts as infer.py starts it (infer.start_ids: an empty one is a fresh document, [EOS]); with
    "chat": true it is sent as one user message through the chat template, as infer.py sends --prompt."""
    if "text" in body and "ids" in body:
        raise UsageError("give text or ids, not both")
    if body.get("chat", False) not in (True, False):
        raise UsageError(f"chat must be true or false, got {body['chat']!r}")
    if body.get("chat") and "ids" in body:
        raise UsageError("chat wraps a text in the chat template: send text, not ids")
    if "ids" in body:
        ids = body["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise UsageError("ids must be a non-empty list of integer token ids")
        bad = next((t for t in ids if not 0 <= t < loaded.tokenizer.vocab_size), None)
        if bad is not None:
            raise UsageError(f"token id {bad} is outside the vocabulary (0 to {loaded.tokenizer.vocab_size - 1})")
    else:
        text = body.get("text", "")
        if not isinstance(text, str):
            raise UsageError(f"text must be a string, got {type(text).__name__}")
        if body.get("chat"):
            ids, _ = loaded.chat.encode([{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            ids = infer.start_ids(loaded.tokenizer, text)
    return within_context(ids, loaded)


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """GET the page's files and /api/info; POST the other endpoints with a JSON object."""

    server_version = "TinyTransformerExplorer"
    timeout = 60  # seconds a silent connection may hold a thread

    def do_GET(self):
        path = urlsplit(self.path).path
        if not self.host_allowed():
            return
        if path in PAGE_FILES:
            name, content_type = PAGE_FILES[path]
            with open(os.path.join(PAGE_DIR, name), "rb") as f:  # read per request: edit the page, reload
                self.send(200, f.read(), content_type)
        elif path == "/api/info":
            self.send_json(self.server.explorer.info())
        elif path == "/favicon.ico":  # browsers ask for it unprompted: answer "nothing here" quietly
            self.send(204, b"", "image/x-icon")
        else:
            self.send_error_json(f"unknown endpoint GET {path}: the page is /, the API is /api/...")

    def do_POST(self):
        started = time.perf_counter()
        path = urlsplit(self.path).path
        if not self.host_allowed():
            return
        explorer = self.server.explorer
        routes = {"/api/next": explorer.next_token, "/api/tokens": explorer.tokens,
                  "/api/attention": explorer.attention, "/api/generate": explorer.generate}
        try:
            if path not in routes:
                self.discard_body()
                raise UsageError(f"unknown endpoint POST {path}: use one of {', '.join(routes)}")
            answer = routes[path](self.read_json())
            if path != "/api/generate":
                payload = json.dumps(answer, allow_nan=False).encode()
        except UsageError as e:
            return self.send_error_json(str(e))
        except Exception as e:  # a bug, not a bad request: say so in one line, log it, keep serving
            traceback.print_exc()
            return self.send_error_json(f"internal error: {type(e).__name__}: {e}", status=500)
        if path == "/api/generate":
            return self.stream_lines(answer)
        self.send(200, payload, "application/json",
                  [("Server-Timing", f"app;dur={(time.perf_counter() - started) * 1000:.2f}")])

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line, an unsupported method, headers too
        long) as one JSON line too; an unsupported method is a bad request like any other."""
        self.close_connection = True
        if code == 501:
            code, message = 400, f"method {self.command} is not supported: GET the page and /api/info, POST the rest"
        self.send_error_json(message or self.responses.get(code, ("error",))[0], status=code)

    # -- reading ----------------------------------------------------------------------------------

    def host_allowed(self) -> bool:
        """On a loopback address, accept only requests addressed to it (no DNS-rebinding from a web page)."""
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "localhost", "::1"):
            return True
        self.send_error_json(f"Host {host!r} is not this loopback server: open http://127.0.0.1:{self.server.server_port}/")
        return False

    def body_length(self) -> int | None:
        length = self.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None

    def read_json(self) -> dict:
        length = self.body_length()
        if length is None:
            raise UsageError("a POST needs a Content-Length header and a JSON object body")
        if length > MAX_BODY:
            self.discard_body()
            raise UsageError(f"request body of {length} bytes exceeds the limit of {MAX_BODY} bytes")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self.discard_body()
            raise UsageError("send the body as JSON with Content-Type: application/json")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw, parse_constant=lambda name: reject_constant(name))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"the body is not valid JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(body, dict):
            raise UsageError(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def discard_body(self) -> None:
        """Read (and drop) a body we refuse, up to 16 MiB, so the client sees our answer and not a reset."""
        remaining = min(self.body_length() or 0, 16 * 1024 * 1024)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        self.close_connection = True

    # -- writing ----------------------------------------------------------------------------------

    def send(self, status: int, payload: bytes, content_type: str, extra_headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if status != 204:  # "no content" carries no length either
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'")  # the page may load nothing from elsewhere
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def send_json(self, answer: dict):
        self.send(200, json.dumps(answer, allow_nan=False).encode(), "application/json")

    def send_error_json(self, message: str, status: int = 400):
        self.send(status, json.dumps({"error": message}).encode(), "application/json")

    def stream_lines(self, lines):
        """Newline-delimited JSON, written as each token is generated; a closed page ends the loop."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            for line in lines:
                self.wfile.write(json.dumps(line).encode() + b"\n")
                self.wfile.flush()
        except (ConnectionError, TimeoutError):
            pass  # the page stopped listening (Stop button, reload): stop generating
        self.close_connection = True

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


def reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


class ExplorerServer(ThreadingHTTPServer):
    daemon_threads = True  # a streaming request never keeps Ctrl-C from stopping the server
    request_queue_size = 64  # connections waiting for a thread (the default 5 refuses a burst of requests)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a page closed mid-answer is normal
            super().handle_error(request, client_address)


def open_server(host: str, port: int) -> ExplorerServer:
    """Bind the port first (cheap), so a busy port is reported before any checkpoint is read."""
    ExplorerServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return ExplorerServer((host, port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} is already in use on {host}: pick another with --port N "
                             "(--port 0 takes any free port)") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e} (check --host and --port)") from None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring's examples as written, and each flag's default."""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--ckpt", default="checkpoints/final.ckpt",
                   help="checkpoint to open; the other .ckpt files of its folder can be picked in the page")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0 = any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback lets anyone who can reach the port use the model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch. The explorer's work is many small operations on one text, where "
                        "a second thread mostly waits (and on a busy machine slows everything down); raise it "
                        "for a large model")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535 (0 = any free port), got {args.port}")
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device, strict=True)
    torch.set_num_threads(args.threads)
    server = open_server(args.host, args.port)
    try:
        main_loaded = Loaded(args.ckpt, device)  # a missing or damaged checkpoint stops here, in one line
        checkpoints = list_checkpoints(args.ckpt)
        main_index = [c["path"] for c in checkpoints].index(os.path.abspath(args.ckpt))
        server.explorer = Explorer(checkpoints, main_index, main_loaded, device)
        server.loopback_only = args.host in ("127.0.0.1", "localhost", "::1")
        server.verbose = args.verbose
        if not server.loopback_only:
            print(f"warning: listening on {args.host}: anyone who can reach port {server.server_port} can use "
                  "the model and this machine's CPU; there is no password", file=sys.stderr)
        meta = main_loaded.meta
        print(f"{meta.get('kind')} checkpoint, step {meta.get('step')}, {meta.get('n_params')} parameters, "
              f"{len(checkpoints)} checkpoint(s) in its folder, {device.type}", file=sys.stderr)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"explore: http://{shown}:{server.server_port}/  (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_cli(main)
