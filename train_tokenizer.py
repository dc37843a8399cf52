"""Train a byte-level BPE tokenizer on your own text, for training with `data.tokenizer_name: DIR`.

Examples:
    python train_tokenizer.py --input data/tiny_corpus.txt --vocab-size 512 --out tokenizers/tiny
    python train_tokenizer.py --input train.txt --heldout val.txt --vocab-size 1024 --out tokenizers/shakespeare
    python train.py --config config_smoke.yaml --set data.tokenizer_name=tokenizers/tiny --no_resume

Byte-level BPE (GPT-2's kind) starts from the 256 byte values, so any text can be encoded and
nothing is ever unknown; it then merges the most frequent adjacent pairs until the vocabulary has
`--vocab-size` entries. A small vocabulary fitted to one corpus makes a small model cheaper: the
embedding and output layers shrink, and each token still covers a few bytes.

The folder holds tokenizer.json (the `tokenizers` library's format) and tokenizer_config.json naming
the EOS token, written by tokenizer.save_tokenizer, so tokenizer.load_tokenizer(DIR) and
transformers.AutoTokenizer both load it; checkpoints record the folder's absolute path, so `--tokenizer auto` finds it again. An existing
folder that is not empty is refused unless --overwrite: retraining changes the ids under every model
trained with it. Each file is written atomically (temporary file, fsync, rename), so a crash or a
full disk never leaves a truncated tokenizer.json.

Compression is reported in bytes per token on held-out text: --heldout FILE, or else the last
--heldout-fraction of the input, which is then left out of the tokenizer's training.
"""

import argparse
import os

from cli import UsageError, read_text, run_cli
from tokenizer import save_tokenizer

EOS, PAD = "<|endoftext|>", "<|pad|>"


def read_inputs(paths: list[str]) -> str:
    """The text of every file, checked first (all must exist and be UTF-8 text) so a mistake costs no training."""
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"input file not found: {path} (pass existing text files to --input)")
    return "".join(read_text(path) for path in paths)


def check_out(folder: str, overwrite: bool) -> None:
    """--out must be a new or empty folder, or --overwrite must say that replacing its tokenizer is meant."""
    if os.path.isfile(folder):
        raise UsageError(f"--out {folder} is a file: name a folder for tokenizer.json and tokenizer_config.json")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise UsageError(f"--out {folder} exists and is not empty: pick a new folder, or pass --overwrite (models "
                         "trained with the tokenizer in it then no longer match it)")


def train_bpe(text: str, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries (EOS and pad included), fitted to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # The GPT-2 split (words, numbers, punctuation, runs of spaces/newlines) then bytes -> printable symbols.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.splitlines(keepends=True)  # newlines kept: they are part of the text to compress
    tokenizer.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)), trainer, length=len(lines))
    return tokenizer


def bytes_per_token(tokenizer, text: str) -> float:
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    return len(text.encode("utf-8")) / max(n_tokens, 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s) to learn from")
    parser.add_argument("--vocab-size", "--vocab_size", type=int, default=1024,
                        help="entries in the vocabulary: 256 bytes + 2 special tokens + merges (default 1024)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json and "
                                                                     "tokenizer_config.json into")
    parser.add_argument("--overwrite", action="store_true", help="replace the tokenizer in an existing --out folder")
    parser.add_argument("--heldout", metavar="FILE", help="text to measure compression on (never trained on)")
    parser.add_argument("--heldout-fraction", "--heldout_fraction", type=float, default=0.05,
                        help="without --heldout: the last fraction of the input held out to measure compression "
                             "(default 0.05; 0 = train on everything and measure on the training text)")
    args = parser.parse_args(argv)
    if args.vocab_size < 258:
        parser.error("--vocab-size must be at least 258 (256 byte values + EOS + pad)")
    if not 0 <= args.heldout_fraction < 1:
        parser.error("--heldout-fraction must be in [0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_out(args.out, args.overwrite)
    text = read_inputs(args.input)
    if args.heldout:
        heldout, where = read_inputs([args.heldout]), args.heldout
    elif args.heldout_fraction > 0:
        cut = int(len(text) * (1 - args.heldout_fraction))
        text, heldout, where = text[:cut], text[cut:], f"the last {args.heldout_fraction:.0%} of the input"
    else:
        heldout, where = text, "the training text itself (no held-out text)"
    if not text.strip():
        raise UsageError("the input text is empty: pass a file with text to --input")
    tokenizer = train_bpe(text, args.vocab_size)
    save_tokenizer(args.out, tokenizer, eos_token=EOS, pad_token=PAD)
    print(f"saved {args.out}: {tokenizer.get_vocab_size()} tokens, trained on {len(text.encode('utf-8')):,} bytes; "
          f"{bytes_per_token(tokenizer, heldout):.3f} bytes/token on {where}")
    print(f"use it: --set data.tokenizer_name={os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
