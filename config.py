"""Typed configuration: every YAML key, its type, default and meaning, validated in one place.

A config file has the sections `model`, `training`, `hardware`, `data` (and `finetune` for SFT).
`load_config` reads the YAML, applies `--set section.key=value` overrides, and checks every key
before anything heavy starts: an unknown key, a wrong type or an impossible value raises
`UsageError` with one line naming the key (and a "did you mean" suggestion).

    cfg = load_config("config_smoke.yaml", overrides=["training.max_steps=10"])
    cfg.training.lr, cfg.model.n_layers

This module imports no torch, so light scripts (list.py) can read a config; the command-line contract
(UsageError, run_cli, exit codes) is cli.py's.
"""

import dataclasses
import difflib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from cli import UsageError, read_text

# training.loggers: the packages each logger needs (any one of them), checked before a run starts.
LOGGER_PACKAGES = {"csv": [], "tensorboard": ["tensorboard", "tensorboardX"], "wandb": ["wandb"],
                   "mlflow": ["mlflow"]}


@dataclass
class EarlyStopping:
    enabled: bool = False  # stop when val loss has not improved for `patience` validations
    patience: int = 5  # validations without improvement before stopping
    min_delta: float = 0.0  # an improvement must beat the best val loss by more than this


@dataclass
class ReduceOnPlateau:
    factor: float = 0.5  # multiply the LR by this when val loss stalls (lr_schedule: plateau only)
    patience: int = 2  # validations without improvement before reducing
    min_lr: float = 1e-6  # never reduce below this


@dataclass
class Training:
    seq_len: int = 256  # tokens per training sequence (must be <= model.max_seq_len)
    micro_batch_size: int = 8  # sequences per forward/backward pass on each device
    grad_accum_steps: int = 1  # micro-batches summed into one optimizer step
    max_steps: int = 1000  # optimizer steps in the whole run
    # Wall-clock budget in seconds for training (validation included; resumes add up); null = none. The LR
    # schedule then runs on whichever budget is nearer its end: step / max_steps or elapsed / max_time.
    max_time: Optional[float] = None
    lr: float = 3e-4  # peak learning rate (of AdamW's parameters when optimizer is muon)
    optimizer: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW for embeddings, head and norms)
    muon_lr: float = 0.02  # peak learning rate of the Muon matrices (optimizer: muon)
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update: fewer are cheaper, rougher
    lr_schedule: str = "warmup_cosine"  # warmup_cosine | wsd (warm-up, stable, decay) | plateau (cut on plateaus)
    warmup_ratio: float = 0.05  # fraction of max_steps spent warming the LR up linearly from 0
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio (warmup_cosine, wsd)
    cooldown_ratio: float = 0.2  # wsd: the final share of the run in which the LR falls linearly to its floor
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms)
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # auto | 32 | bf16-mixed | 16-mixed  (auto: best the device supports)
    seed: int = 1337  # seeds weights, data order and dropout
    val_every: int = 100  # run validation every this many optimizer steps (and at the end)
    val_batches: int = 50  # at most this many validation batches per validation
    log_every: int = 10  # print a log line every this many optimizer steps
    save_every: int = 100  # write a checkpoint every this many optimizer steps
    keep_last: int = 3  # periodic checkpoints kept on disk (best/last/final are never deleted); 0 = all
    checkpoint_dir: str = "checkpoints"  # where .ckpt files, metrics.csv and loss_curve.png go
    auto_resume: bool = True  # continue from the newest checkpoint in checkpoint_dir
    reset_lr_on_resume: bool = False  # on resume, restart the LR schedule (warm-up included) from step 0
    compile: bool = False  # torch.compile the model (compiling takes a while at start-up; see docs/PERFORMANCE.md)
    # Where the metrics go: csv (metrics.csv in checkpoint_dir, read by list.py and plots.py), and any of
    # tensorboard, wandb, mlflow when that package is installed. All through Lightning's loggers.
    loggers: list = field(default_factory=lambda: ["csv"])
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    reduce_on_plateau: ReduceOnPlateau = field(default_factory=ReduceOnPlateau)


@dataclass
class Hardware:
    accelerator: str = "auto"  # auto | cpu | cuda | mps  (auto: cuda, then mps, then cpu)
    devices: Union[int, str] = 1  # devices per node, or "auto"
    num_nodes: int = 1  # machines in a multi-node run
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed  (Lightning's; fsdp shards each Transformer block)
    num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)


@dataclass
class Data:
    dataset: str = "data/tiny_corpus.txt"  # local .txt/.jsonl/folder/glob/saved dataset, or a Hub dataset name
    config: Optional[str] = None  # Hub dataset configuration (e.g. 20231101.en)
    split: str = "train"  # Hub split to train on
    data_files: Optional[str] = None  # local file(s) read through `datasets` with dataset: json | text | parquet
    val_dataset: Optional[str] = None  # a separate validation source (path or Hub name); null = hold out from dataset
    val_split: Optional[str] = None  # Hub split for validation; null = hold out val_docs documents (see data.py)
    val_docs: int = 50  # documents held out for validation when there is no separate split
    train_docs: Optional[int] = None  # cap on training documents (needed to bound a streamed dataset)
    text_field: str = "text"  # field holding the text in .jsonl files and datasets
    txt_documents: str = "line"  # in .txt files: line (one document per line) | paragraph | file
    streaming: bool = False  # stream a Hub dataset instead of downloading it whole
    shuffle_buffer: int = 0  # shuffle a streamed training set through a buffer of this many documents
    max_doc_len: int = 0  # truncate each document to this many tokens (0 = no limit)
    tokenizer_name: str = "gpt2"  # gpt2 (bundled, offline) | a local tokenizer folder | a Hub name
    offline: bool = False  # never contact the Hub (HF_HUB_OFFLINE=1 does the same)
    # Token ids of each tokenized corpus part are kept here (keyed by content + tokenizer + data settings),
    # so the next run on the same data skips tokenizing; null = never cache.
    cache_dir: Optional[str] = ".cache/tokens"


@dataclass
class Finetune:
    """Section `finetune` (finetune.py only). The model dims come from the base checkpoint, not from `model:`."""

    base_checkpoint: str = "checkpoints/final.ckpt"  # pretrained weights to start from; they fix the architecture
    # Examples longer than training.seq_len + 1 tokens are cut: first the input text, then the response
    # (which then loses its EOS); the instruction and the section headers are never cut. An example whose
    # instruction alone does not fit is skipped and counted.


@dataclass
class Model:
    """Section `model`: the fields of model.ModelConfig (documented there), each null unless the file sets it.

    A key left out takes ModelConfig's default, except two that follow the run: vocab_size (the tokenizer's
    vocabulary, padded to a multiple of 64) and max_seq_len (training.seq_len). finetune.py compares the keys
    a file does set with the base checkpoint's architecture. tests/test_config.py checks that these fields
    are exactly ModelConfig's.
    """

    vocab_size: Optional[int] = None
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    dropout: Optional[float] = None
    rope_theta: Optional[float] = None
    norm_eps: Optional[float] = None
    max_seq_len: Optional[int] = None
    tie_embeddings: Optional[bool] = None
    swa_window: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    mlp: Optional[str] = None
    qk_norm: Optional[bool] = None
    logit_softcap: Optional[float] = None
    zero_init: Optional[bool] = None

    def given(self) -> dict:
        """The keys the config file (or --set) gave a value."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Config:
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    hardware: Hardware = field(default_factory=Hardware)
    data: Data = field(default_factory=Data)
    finetune: Optional[Finetune] = None  # finetune.py's section; present in SFT configs and checkpoints

    def to_dict(self) -> dict:
        """Every section as plain data: what a checkpoint stores."""
        return {name: dataclasses.asdict(value) for name, value in vars(self).items() if value is not None}


def _check_type(key: str, value: Any, hint) -> Any:
    """Return value converted to `hint` (int -> float is allowed), or raise UsageError."""
    if get_origin(hint) is Union:
        options = [o for o in get_args(hint) if o is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        if len(options) == 1:  # Optional[X]: X's own message (e.g. "must be a finite number")
            return _check_type(key, value, options[0])
        for option in options:
            try:
                return _check_type(key, value, option)
            except UsageError:
                pass
        names = " or ".join("null" if o is type(None) else o.__name__ for o in get_args(hint))
        raise UsageError(f"{key} must be {names}, got {value!r}")
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # an int, or a string: YAML reads 3e-4 as one
        except ValueError:
            raise UsageError(f"{key} must be float, got {value!r}") from None
        if not math.isfinite(number):
            raise UsageError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `precision: 32` or `--set training.precision=32` means the string "32"
    if hint is bool and not isinstance(value, bool) or hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{key} must be {hint.__name__}, got {value!r}")
    if hint is int and not -2**63 <= value < 2**63:
        raise UsageError(f"{key} is {value}: far beyond anything this project can run (and beyond a 64-bit integer)")
    if not isinstance(value, hint):
        raise UsageError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _unknown_key(section: str, key: str, known) -> UsageError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"
    where = f"{section}.{key}" if section else key
    return UsageError(f"unknown config key '{where}'{hint}")


def _build_section(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise UsageError(f"config section '{prefix}' must be a mapping of keys to values, got {values!r}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(prefix, key, hints)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build_section(hint, value or {}, f"{prefix}.{key}")
        else:
            kwargs[key] = _check_type(f"{prefix}.{key}", value, list if hint is list else hint)
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Validate a plain dict (from YAML or a checkpoint) into a Config."""
    sections = {"model": Model, "training": Training, "hardware": Hardware, "data": Data, "finetune": Finetune}
    for name in raw:
        if name not in sections:
            raise _unknown_key("", name, sections)
    cfg = Config(**{name: _build_section(cls, raw.get(name) or {}, name) for name, cls in sections.items()
                    if name in raw or name != "finetune"})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Rules that involve values, not just types."""
    t = cfg.training
    positive = {"training.seq_len": t.seq_len, "training.micro_batch_size": t.micro_batch_size,
                "training.grad_accum_steps": t.grad_accum_steps, "training.max_steps": t.max_steps,
                "training.val_every": t.val_every, "training.val_batches": t.val_batches,
                "training.log_every": t.log_every, "training.save_every": t.save_every}
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{key} must be a positive integer, got {value}")
    if not t.lr > 0:
        raise UsageError(f"training.lr must be positive, got {t.lr}")
    if t.optimizer not in ("adamw", "muon"):
        raise UsageError(f"training.optimizer must be adamw or muon, got {t.optimizer!r}")
    if not t.muon_lr > 0 or not 1 <= t.muon_ns_steps <= 20:
        raise UsageError(f"training.muon_lr must be positive and training.muon_ns_steps in 1..20, got {t.muon_lr} "
                         f"and {t.muon_ns_steps}")
    if t.lr_schedule not in ("warmup_cosine", "wsd", "plateau"):
        raise UsageError(f"training.lr_schedule must be warmup_cosine, wsd or plateau, got {t.lr_schedule!r}")
    if not 0 < t.cooldown_ratio <= 1:
        raise UsageError(f"training.cooldown_ratio must be in (0, 1], got {t.cooldown_ratio}")
    if not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise UsageError("training.warmup_ratio must be in [0, 1) and training.min_lr_ratio in [0, 1]")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        raise UsageError(f"training.betas must be two numbers in [0, 1), got {t.betas}")
    if t.precision not in ("auto", "32", "bf16-mixed", "16-mixed", "bf16-true"):
        raise UsageError(f"training.precision must be auto, 32, bf16-mixed or 16-mixed, got {t.precision!r}")
    if t.max_time is not None and not t.max_time > 0:
        raise UsageError(f"training.max_time must be a positive number of seconds (or null), got {t.max_time}")
    if t.keep_last < 0 or t.grad_clip < 0:
        raise UsageError("training.keep_last and training.grad_clip must be >= 0")
    if not 0 <= t.seed < 2**32:
        raise UsageError(f"training.seed must be in [0, 2**32), got {t.seed}")
    if not t.checkpoint_dir.strip():
        raise UsageError("training.checkpoint_dir is empty: name a folder for the checkpoints (e.g. checkpoints)")
    if os.path.isfile(t.checkpoint_dir):
        raise UsageError(f"training.checkpoint_dir {t.checkpoint_dir} is a file, not a folder: pick a folder name")
    for name in t.loggers:
        if not isinstance(name, str) or name not in LOGGER_PACKAGES:
            raise UsageError(f"training.loggers: unknown logger {name!r} (choose from {', '.join(LOGGER_PACKAGES)})")
        packages = LOGGER_PACKAGES[name]
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise UsageError(f"training.loggers: {name} needs the {LOGGER_PACKAGES[name][0]} package: "
                             f"pip install {LOGGER_PACKAGES[name][0]}, or remove {name} from training.loggers")
    hw = cfg.hardware
    if hw.accelerator not in ("auto", "cpu", "cuda", "gpu", "mps"):
        raise UsageError(f"hardware.accelerator must be auto, cpu, cuda or mps, got {hw.accelerator!r}")
    if hw.devices != "auto" and (not isinstance(hw.devices, int) or hw.devices < 1):
        raise UsageError(f"hardware.devices must be a positive integer or auto, got {hw.devices!r}")
    if hw.num_nodes < 1 or hw.num_workers < 0:
        raise UsageError(f"hardware.num_nodes must be >= 1 and hardware.num_workers >= 0, got {hw.num_nodes} "
                         f"and {hw.num_workers}")
    if hw.strategy not in ("auto", "ddp", "fsdp", "deepspeed"):
        raise UsageError(f"hardware.strategy must be auto, ddp, fsdp or deepspeed, got {hw.strategy!r}")
    if hw.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("hardware.strategy deepspeed needs the deepspeed package: pip install deepspeed, "
                         "or use ddp / fsdp")
    if cfg.data.txt_documents not in ("line", "paragraph", "file"):
        raise UsageError(f"data.txt_documents must be line, paragraph or file, got {cfg.data.txt_documents!r}")
    if cfg.data.val_docs < 0:
        raise UsageError(f"data.val_docs must be >= 0, got {cfg.data.val_docs}")
    max_seq_len = cfg.model.max_seq_len
    if max_seq_len is not None and t.seq_len > max_seq_len:
        raise UsageError(f"training.seq_len ({t.seq_len}) exceeds model.max_seq_len ({max_seq_len}): "
                         "lower seq_len or raise max_seq_len")
    try:
        model_config(cfg, vocab_size=cfg.model.vocab_size or 64)
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_config(cfg: Config, vocab_size: int):
    """The ModelConfig a Config describes; vocab_size comes from the tokenizer unless the config sets it."""
    from model import ModelConfig

    values = cfg.model.given()
    values.setdefault("vocab_size", vocab_size)
    values.setdefault("max_seq_len", cfg.training.seq_len)
    return ModelConfig(**values)


def parse_override(text: str):
    """'training.lr=1e-3' -> (['training', 'lr'], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise UsageError(f"--set expects section.key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip().split("."), value


def read_yaml(path: str) -> dict:
    """A YAML config file as a dict, checked: UTF-8 text, valid YAML, a non-empty mapping, no key written twice
    (PyYAML would silently keep the last of two `lr:` lines, or of two `training:` sections)."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path} (pass --config with an existing YAML file)")
    text = read_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes with line numbers, to find duplicate keys
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever PyYAML says
        raise UsageError(f"YAML syntax error in {path}{where}: {problem}") from None
    todo, seen_nodes = [(root, "")], set()
    while todo:  # every mapping in the file, nested ones included
        node, prefix = todo.pop()
        if id(node) in seen_nodes:  # an alias (*name) repeats a node: check it once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key, value in node.value:
                is_name = isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge"  # not `<<: *x`
                name = f"{prefix}{key.value}" if is_name else None
                if name in first_line:
                    raise UsageError(f"duplicate key '{name}' in {path} at line {key.start_mark.line + 1} (first at "
                                     f"line {first_line[name]}): YAML would keep only the last one; remove one")
                if name:
                    first_line[name] = key.start_mark.line + 1
                todo.append((value, f"{name}." if name else prefix))
        elif isinstance(node, yaml.SequenceNode):
            todo += [(item, prefix) for item in node.value]
    if config is None:
        raise UsageError(f"{path} is empty: a config needs at least one section (model:, training:, hardware:, "
                         "data:); see config_smoke.yaml")
    if not isinstance(config, dict):
        raise UsageError(f"{path} must contain a mapping of sections (model:, training:, ...)")
    return config


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {text}: {part} is not a section")
        node[path[-1]] = value
    return raw


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config file."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides))
