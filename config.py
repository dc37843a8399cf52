"""Typed configuration: every YAML key, its type, default and meaning, validated in one place.

A config file has the sections `model`, `training`, `hardware`, `data` (and `finetune` for SFT).
`load_config` reads the YAML, applies `--set section.key=value` overrides, and checks every key
before anything heavy starts: an unknown key, a wrong type or an impossible value raises
`UsageError` with one line naming the key (and a "did you mean" suggestion).

    cfg = load_config("config_smoke.yaml", overrides=["training.max_steps=10"])
    cfg.training.lr, cfg.model  # model: the ModelConfig keys the file sets, e.g. {"n_layers": 2}

Each key's type declares the values it allows (`Literal[...]` choices, `Range` bounds: schema.py), once:
the check, its error message and the "allowed" column of docs/CONFIG_REFERENCE.md all come from it.
`validate` keeps the rules that tie keys together. The `model` section is model.ModelConfig's fields.

This module imports no torch, so light scripts (list.py) can read a config; the command-line contract
(UsageError, run_cli, exit codes) is cli.py's.
"""

import dataclasses
import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

import schema
from cli import UsageError, read_text
from schema import NonNegativeInt, PositiveFloat, PositiveInt, Range

# training.loggers: the packages a logger needs (any one of them), checked before a run starts; csv needs none.
LOGGER_PACKAGES = {"tensorboard": ["tensorboard", "tensorboardX"], "wandb": ["wandb"], "mlflow": ["mlflow"]}


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
    seq_len: PositiveInt = 256  # tokens per training sequence (must be <= model.max_seq_len)
    micro_batch_size: PositiveInt = 8  # sequences per forward/backward pass on each device
    grad_accum_steps: PositiveInt = 1  # micro-batches summed into one optimizer step
    # Optimizer steps in the whole run; null = no step limit, for a run that max_time ends (a time-boxed run).
    max_steps: Optional[PositiveInt] = 1000
    # Wall-clock budget in seconds for training (validation included; resumes add up); null = none. The LR
    # schedule then runs on whichever budget is nearer its end: step / max_steps or elapsed / max_time.
    max_time: Optional[PositiveFloat] = None
    lr: PositiveFloat = 3e-4  # peak learning rate (of AdamW's parameters when optimizer is muon)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the hidden matrices, AdamW for the rest
    muon_lr: PositiveFloat = 0.02  # peak learning rate of the Muon matrices (optimizer: muon)
    muon_ns_steps: Annotated[int, Range(ge=1, le=20)] = 5  # Newton-Schulz iterations per Muon update: fewer = rougher
    lr_schedule: Literal["warmup_cosine", "wsd", "plateau"] = "warmup_cosine"  # wsd: warm-up, stable, decay
    warmup_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.05  # share of the run warming the LR up linearly from 0
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1  # the schedule ends at lr * min_lr_ratio (not plateau)
    cooldown_ratio: Annotated[float, Range(gt=0, le=1)] = 0.2  # wsd: the final share, the LR falling to its floor
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms)
    betas: list[Annotated[float, Range(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's two
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: Annotated[float, Range(ge=0)] = 1.0  # max global gradient norm; 0 disables clipping
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"  # auto: the best the device has
    seed: Annotated[int, Range(ge=0, lt=2**32)] = 1337  # seeds weights, data order and dropout
    val_every: Optional[PositiveInt] = 100  # validate every this many optimizer steps and at the end; null = at the end
    val_batches: PositiveInt = 50  # at most this many validation batches per validation
    log_every: PositiveInt = 10  # print a log line every this many optimizer steps
    save_every: Optional[PositiveInt] = 100  # a checkpoint every this many optimizer steps; null = only at the end
    keep_last: NonNegativeInt = 3  # periodic checkpoints kept on disk (best/last/final are never deleted); 0 = all
    checkpoint_dir: str = "checkpoints"  # where .ckpt files, metrics.csv and loss_curve.png go
    auto_resume: bool = True  # continue from the newest checkpoint in checkpoint_dir
    reset_lr_on_resume: bool = False  # on resume, restart the LR schedule (warm-up included) from step 0
    compile: bool = False  # torch.compile the model (compiling takes a while at start-up; see docs/PERFORMANCE.md)
    # Where the metrics go: csv (metrics.csv in checkpoint_dir, read by list.py and plots.py), and any of
    # tensorboard, wandb, mlflow when that package is installed. All through Lightning's loggers.
    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["csv"])
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    reduce_on_plateau: ReduceOnPlateau = field(default_factory=ReduceOnPlateau)


@dataclass
class Hardware:
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"  # auto: cuda, then mps, then cpu; gpu = cuda
    devices: Union[PositiveInt, Literal["auto"]] = 1  # devices per node, or auto (all)
    num_nodes: PositiveInt = 1  # machines in a multi-node run
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"  # Lightning's; fsdp shards each Transformer block
    num_workers: NonNegativeInt = 0  # DataLoader worker processes (0 = load in the training process)


@dataclass
class Data:
    dataset: str = "data/tiny_corpus.txt"  # local .txt/.jsonl/folder/glob/saved dataset, or a Hub dataset name
    config: Optional[str] = None  # Hub dataset configuration (e.g. 20231101.en)
    split: str = "train"  # Hub split to train on
    data_files: Optional[str] = None  # local file(s) read through `datasets` with dataset: json | text | parquet
    val_dataset: Optional[str] = None  # a separate validation source (path or Hub name); null = hold out from dataset
    val_split: Optional[str] = None  # Hub split for validation; null = hold out val_docs documents (see data.py)
    val_docs: NonNegativeInt = 50  # documents held out for validation when there is no separate split
    train_docs: Optional[int] = None  # cap on training documents (needed to bound a streamed dataset)
    text_field: str = "text"  # field holding the text in .jsonl files and datasets
    txt_documents: Literal["line", "paragraph", "file"] = "line"  # a .txt document: a line, a paragraph or the file
    streaming: bool = False  # stream a Hub dataset instead of downloading it whole
    shuffle_buffer: int = 0  # shuffle a streamed training set through a buffer of this many documents
    max_doc_len: int = 0  # truncate each document to this many tokens (0 = no limit)
    tokenizer_name: str = "gpt2"  # gpt2 (bundled, offline) | a local tokenizer folder | a Hub name
    offline: bool = False  # never contact the Hub (HF_HUB_OFFLINE=1 does the same)
    # Token ids of each tokenized corpus part are kept here (keyed by content + tokenizer + data settings),
    # so the next run on the same data skips tokenizing; null = never cache.
    cache_dir: Optional[str] = ".cache/tokens"


# The projections LoRA can adapt (model.Attention, model.SwiGLU; relu2's MLP has no gate_proj).
LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRA:
    """Sub-section `finetune.lora` (lora.py): train a low-rank update B A beside each target projection W,
    the base frozen. Absent or null = full fine-tuning (every weight trains)."""

    rank: PositiveInt = 8  # r: A is r x in, B is out x r; trainable numbers grow linearly with it
    alpha: PositiveFloat = 16.0  # the update is (alpha / rank) * B A
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0  # on the adapters' input, training only
    targets: list[LoRATarget] = field(default_factory=lambda: list(get_args(LoRATarget)))  # default: all seven


@dataclass
class Finetune:
    """Section `finetune` (finetune.py only). The model dims come from the base checkpoint, not from `model:`."""

    base_checkpoint: str = "checkpoints/final.ckpt"  # pretrained weights to start from; they fix the architecture
    lora: Optional[LoRA] = None  # LoRA adapters instead of training every weight; null = full fine-tuning
    # Examples longer than training.seq_len + 1 tokens are cut: first the input text, then the response
    # (which then loses its EOS); the instruction and the section headers are never cut. An example whose
    # instruction alone does not fit is skipped and counted.


@dataclass
class Config:
    # Section `model`: the model.ModelConfig fields the file sets, checked against ModelConfig's own
    # declarations (names, types, allowed values). A key left out takes ModelConfig's default (model_config),
    # except two that follow the run: vocab_size (the tokenizer's) and max_seq_len (training.seq_len).
    # finetune.py compares the keys a file sets with the base checkpoint's architecture.
    model: dict = field(default_factory=dict)
    training: Training = field(default_factory=Training)
    hardware: Hardware = field(default_factory=Hardware)
    data: Data = field(default_factory=Data)
    finetune: Optional[Finetune] = None  # finetune.py's section; present in SFT configs and checkpoints

    def to_dict(self) -> dict:
        """Every section as plain data: what a checkpoint stores."""
        return {name: dict(value) if isinstance(value, dict) else dataclasses.asdict(value)
                for name, value in vars(self).items() if value is not None}


def _unknown_key(section: str, key: str, known) -> UsageError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"
    where = f"{section}.{key}" if section else key
    return UsageError(f"unknown config key '{where}'{hint}")


def _checked(cls, values: dict, prefix: str, null_is_unset: bool = False) -> dict:
    """A section's values, each key a field of dataclass `cls` and checked against that field's declared type.
    null_is_unset (the model section): a null value means "not set", and is left out."""
    if not isinstance(values, dict):
        raise UsageError(f"config section '{prefix}' must be a mapping of keys to values, got {values!r}")
    hints = get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown_key(prefix, key, known)
        if value is None and null_is_unset:
            continue
        sub = section_class(hints[key])
        if sub and value is None and sub is not hints[key]:  # an optional sub-section set to null: off
            checked[key] = None
            continue
        if sub:  # a sub-section (training.early_stopping, finetune.lora)
            checked[key] = sub(**_checked(sub, value or {}, f"{prefix}.{key}"))
            continue
        try:
            checked[key] = schema.check(f"{prefix}.{key}", value, hints[key])
        except ValueError as e:
            raise UsageError(str(e)) from None
    return checked


def section_class(hint):
    """The dataclass of a sub-section field, also of an optional one (Optional[LoRA]); None for a plain key."""
    options = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is Union else [hint]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def config_from_dict(raw: dict) -> Config:
    """Validate a plain dict (from YAML or a checkpoint) into a Config."""
    from model import ModelConfig  # imports torch: only here, so that light scripts can import this module

    sections = {"model": ModelConfig, "training": Training, "hardware": Hardware, "data": Data, "finetune": Finetune}
    for name in raw:
        if name not in sections:
            raise _unknown_key("", name, sections)
    cfg = Config(model=_checked(ModelConfig, raw.get("model") or {}, "model", null_is_unset=True),
                 **{name: cls(**_checked(cls, raw.get(name) or {}, name)) for name, cls in sections.items()
                    if name != "model" and (name in raw or name != "finetune")})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """The rules that tie keys together or look beyond the config (files, installed packages). Each key's own
    allowed values were checked against its declaration when the key was read."""
    t = cfg.training
    if t.max_steps is None and t.max_time is None:
        raise UsageError("training.max_steps is null (no step limit) but training.max_time is not set: give "
                         "max_steps, or max_time (seconds) for a time-boxed run")
    if len(t.betas) != 2:
        raise UsageError(f"training.betas must be two numbers in [0, 1), got {t.betas}")
    if not t.checkpoint_dir.strip():
        raise UsageError("training.checkpoint_dir is empty: name a folder for the checkpoints (e.g. checkpoints)")
    if os.path.isfile(t.checkpoint_dir):
        raise UsageError(f"training.checkpoint_dir {t.checkpoint_dir} is a file, not a folder: pick a folder name")
    for name in t.loggers:
        packages = LOGGER_PACKAGES.get(name, [])
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise UsageError(f"training.loggers: {name} needs the {packages[0]} package: pip install {packages[0]}, "
                             f"or remove {name} from training.loggers")
    if t.optimizer == "muon" and (t.precision == "16-mixed" or cfg.hardware.strategy == "fsdp"):
        # training.clip_gradients clips one global norm over both optimizers: that needs plain, whole gradients
        # (float16's loss scaler unscales and updates per optimizer; FSDP shards the matrices Muon orthogonalises)
        raise UsageError(f"training.optimizer muon does not run with "
                         f"{'precision 16-mixed' if t.precision == '16-mixed' else 'hardware.strategy fsdp'}: use "
                         "precision bf16-mixed or 32 and strategy auto or ddp, or optimizer adamw")
    lora = cfg.finetune.lora if cfg.finetune else None
    if lora and not lora.targets:
        raise UsageError("finetune.lora.targets is empty: name the projections to adapt (e.g. [q_proj, v_proj]), "
                         "or set finetune.lora: null for full fine-tuning")
    if lora and len(set(lora.targets)) < len(lora.targets):
        raise UsageError(f"finetune.lora.targets names a projection twice ({lora.targets}): name each once")
    if lora and t.optimizer == "muon":
        raise UsageError("training.optimizer muon with finetune.lora: Muon orthogonalises whole matrices, not rank-"
                         f"{lora.rank} factors; use optimizer adamw, or full fine-tuning (finetune.lora: null)")
    if cfg.hardware.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("hardware.strategy deepspeed needs the deepspeed package: pip install deepspeed, "
                         "or use ddp / fsdp")
    try:
        model = model_config(cfg, vocab_size=64)  # (the file's own vocab_size, if it sets one)
    except ValueError as e:  # the rules that tie model keys together (ModelConfig.__post_init__)
        raise UsageError(str(e)) from None
    if t.seq_len > model.max_seq_len:
        raise UsageError(f"training.seq_len ({t.seq_len}) exceeds model.max_seq_len ({model.max_seq_len}): "
                         "lower seq_len or raise max_seq_len")


def model_config(cfg: Config, vocab_size: int):
    """The ModelConfig a Config describes; vocab_size comes from the tokenizer unless the config sets it."""
    from model import ModelConfig

    return ModelConfig(**{"vocab_size": vocab_size, "max_seq_len": cfg.training.seq_len, **cfg.model})


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
