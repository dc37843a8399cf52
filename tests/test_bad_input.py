"""Bad input, table-driven: every script answers a mistake with ONE line naming the problem and the fix.

Each row runs a script's `main(argv)` in this process, wrapped in cli.run_cli exactly as
`python SCRIPT.py ...` does, and checks: exit code 2, stderr is a single `error: ...` line that
matches the row's pattern (the problem and the fix), no traceback, and no file in the work folder
created, changed or removed. A few rows also run as real subprocesses to prove the same from the
outside. docs/TROUBLESHOOTING.md lists these messages.
"""

import hashlib
import json
import re
import shutil

import pytest
import torch

import cli
import convert
import eval_val
import evaluate_checkpoints
import finetune
import infer
import list as list_script
import train
import train_tokenizer
from checkpoint import save_checkpoint
from cli import pick_device
from conftest import ROOT, run_script, write_config
from model import ModelConfig, Transformer

SCRIPTS = {"train.py": train, "finetune.py": finetune, "infer.py": infer, "eval_val.py": eval_val,
           "evaluate_checkpoints.py": evaluate_checkpoints, "list.py": list_script, "convert.py": convert,
           "train_tokenizer.py": train_tokenizer}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_ckpt):
    """A folder of good and bad inputs; rows name files in it as {work}/NAME."""
    folder = tmp_path_factory.mktemp("bad_input")
    write_config(folder)  # config.yaml: a good tiny config, checkpoints in {work}/checkpoints
    (folder / "broken.yaml").write_text("training:\n  lr: [0.1\n")
    (folder / "empty.txt").write_text("")
    (folder / "short.txt").write_text("One line.\nAnother line.\nA third one.\n")
    write_config(folder, {"data": {"dataset": str(folder / "empty.txt"), "val_docs": 0}}, "empty_corpus.yaml")
    write_config(folder, {"data": {"dataset": str(folder / "short.txt"), "val_docs": 1}}, "short_corpus.yaml")
    write_config(folder, {"data": {"dataset": str(folder / "missing.txt")}}, "missing_data.yaml")
    write_config(folder, {"data": {"dataset": "nobody-has/this-dataset", "offline": True}}, "hub_offline.yaml")
    write_config(folder, {"training": {"lrr": 0.1}}, "unknown_key.yaml")
    write_config(folder, {"training": {"max_steps": "ten"}}, "wrong_type.yaml")
    shutil.copy(tiny_ckpt, folder / "model.ckpt")
    (folder / "truncated.ckpt").write_bytes((folder / "model.ckpt").read_bytes()[:4096])
    (folder / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, folder / "foreign.ckpt")  # a valid torch file, not ours
    small = ModelConfig(vocab_size=256, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16)
    state = Transformer(small).state_dict()
    save_checkpoint({"state_dict": state, "meta": {"kind": "pretrain", "step": 1, "model_config": vars(small),
                                                   "tokenizer": "gpt2", "config": {}}}, str(folder / "small_vocab.ckpt"))
    (folder / "cases_mapping.yaml").write_text("prompt: The capital of France is\ntarget: ' Paris'\n")
    (folder / "cases_unknown.yaml").write_text("- prompt: Hello\n  answer: ' world'\n")
    (folder / "no_output.jsonl").write_text("\n".join(json.dumps({"instruction": f"Say {i}", "output": str(i)})
                                                      for i in range(5)) + '\n{"instruction": "Say hi"}\n')
    (folder / "sft.yaml").write_text(
        f"finetune:\n  base_checkpoint: {folder / 'model.ckpt'}\n"
        f"training:\n  seq_len: 32\n  checkpoint_dir: {folder / 'sft'}\n"
        f"data:\n  dataset: {folder / 'no_output.jsonl'}\n  val_docs: 2\n")
    (folder / "sft_no_base.yaml").write_text(f"finetune:\n  base_checkpoint: {folder / 'nothing.ckpt'}\n")
    (folder / "hf_out").mkdir()
    (folder / "hf_out" / "config.json").write_text("{}")
    swa = ModelConfig(vocab_size=256, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16, swa_window=4)
    save_checkpoint({"state_dict": Transformer(swa).state_dict(),
                     "meta": {"kind": "pretrain", "step": 1, "model_config": vars(swa), "tokenizer": "gpt2"}},
                    str(folder / "swa.ckpt"))
    from tokenizers import Tokenizer, models  # a word-level tokenizer: no GGUF "gpt2" vocabulary can hold it

    (folder / "words").mkdir()
    Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "word": 2}, unk_token="<unk>")).save(str(folder / "words" / "tokenizer.json"))
    (folder / "words" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    save_checkpoint({"state_dict": state, "meta": {"kind": "pretrain", "step": 1, "model_config": vars(small),
                                                   "tokenizer": str(folder / "words")}}, str(folder / "words.ckpt"))
    # Config files: not UTF-8, binary, a key or a section written twice, empty, not a mapping.
    (folder / "latin1.yaml").write_bytes(b"training:\n  lr: 0.001  # r\xe9glage\n")
    (folder / "binary.yaml").write_bytes(b"training:\n  lr: \x00\x01\n")
    (folder / "dup_key.yaml").write_text("training:\n  lr: 0.001\n  seed: 1\n  lr: 0.01\n")
    (folder / "dup_section.yaml").write_text("training:\n  lr: 0.001\ndata:\n  val_docs: 4\ntraining:\n  seed: 2\n")
    (folder / "empty.yaml").write_text("# nothing but a comment\n")
    (folder / "list.yaml").write_text("- training\n- data\n")
    # Data files: not UTF-8, binary, records of the wrong type, a damaged parquet, SFT fields of the wrong type.
    (folder / "latin1.txt").write_bytes(b"Une ligne.\nCaf\xe9 cr\xe8me.\n")
    (folder / "nul.txt").write_bytes(b"text\x00\x00\x00binary\n")
    (folder / "list.jsonl").write_text('{"text": "fine"}\n["a", "list"]\n')
    (folder / "number.jsonl").write_text('3.5\n')
    (folder / "null_text.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (folder / "int_text.jsonl").write_text('{"text": 12}\n')
    (folder / "fake.parquet").write_bytes(b"PAR1 definitely not a parquet file")
    (folder / "notes").mkdir()
    (folder / "notes" / "README.md").write_text("a folder without data files")
    (folder / "sft_input.jsonl").write_text('{"instruction": "Add", "input": 5, "output": "6"}\n' * 3)
    (folder / "sft_instruction.jsonl").write_text('{"instruction": ["a"], "output": "6"}\n' * 3)
    # A tokenizer folder whose tokenizer.json was cut short by a full disk.
    (folder / "bad_tok").mkdir()
    (folder / "bad_tok" / "tokenizer.json").write_text('{"version": "1.0", "truncation": null, "model": {"ty')
    (folder / "bad_tok" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    # Checkpoints whose meta is missing, malformed or not the weights' (issue 14): every script says so in one line.
    torch.save({"state_dict": state}, folder / "no_meta.ckpt")
    save_checkpoint({"state_dict": state, "meta": [1, 2]}, str(folder / "meta_list.ckpt"))
    save_checkpoint({"state_dict": state, "meta": {"kind": "pretrain", "model_config": {**vars(small), "n_layers": "two"},
                                                   "tokenizer": "gpt2"}}, str(folder / "meta_broken.ckpt"))
    wider = {**vars(small), "d_model": 32, "vocab_size": 50304}
    save_checkpoint({"state_dict": state, "meta": {"kind": "pretrain", "step": 1, "model_config": wider,
                                                   "tokenizer": "gpt2", "config": {}}}, str(folder / "mismatch.ckpt"))
    (folder / "mismatch_sft.yaml").write_text(
        f"finetune:\n  base_checkpoint: {folder / 'mismatch.ckpt'}\ntraining:\n  seq_len: 16\n  checkpoint_dir: "
        f"{folder / 'sft2'}\ndata:\n  dataset: {ROOT / 'data' / 'tiny_instructions.jsonl'}\n  val_docs: 2\n")
    # Hugging Face folders for convert.py from-hf: a broken config, missing or impossible values, damaged weights.
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 50304, "hidden_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32}
    for name, config, files in [
            ("hf_badjson", "{not json", {}),
            ("hf_zero_heads", json.dumps({**llama, "num_attention_heads": 0}), {}),
            ("hf_no_width", json.dumps({k: v for k, v in llama.items() if k != "hidden_size"}), {}),
            ("hf_corrupt", json.dumps(llama), {"model.safetensors": b"this is not a safetensors file"}),
            ("hf_index", json.dumps(llama), {"model.safetensors.index.json": b'{"metadata": {}}'}),
            ("hf_pickle", json.dumps(llama), {})]:
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(config)
        for file, content in files.items():
            (folder / name / file).write_bytes(content)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Exception("runs code")},
               folder / "hf_pickle" / "pytorch_model.bin")  # an object beyond tensors: unpickling could run code
    return folder


# (script, arguments, pattern the one stderr line must match: the problem ... the fix)
ROWS = [
    ("train.py", "--config {work}/nope.yaml", r"config file not found: .*nope\.yaml \(pass --config with an existing"),
    ("train.py", "--config {work}/broken.yaml", r"YAML syntax error in .*broken\.yaml at line 3"),
    ("train.py", "--config {work}/unknown_key.yaml", r"unknown config key 'training\.lrr' \(did you mean 'lr'\?\)"),
    ("train.py", "--config {work}/wrong_type.yaml", r"training\.max_steps must be an integer >= 1 or null, got 'ten'"),
    ("train.py", "--config {work}/config.yaml --set training.lr", r"--set expects section\.key=value"),
    ("train.py", "--config {work}/config.yaml --set model.d_model=30", r"model\.d_model \(30\) must be divisible by model\.n_heads \(4\)"),
    ("train.py", "--config {work}/config.yaml --set model.n_kv_heads=3", r"model\.n_heads \(4\) must be divisible by model\.n_kv_heads \(3\)"),
    ("train.py", "--config {work}/config.yaml --set training.seq_len=64",
     r"training\.seq_len \(64\) exceeds model\.max_seq_len \(32\): lower seq_len or raise max_seq_len"),
    ("train.py", "--config {work}/empty_corpus.yaml", r"no .*text|empty|has 0 documents"),
    ("train.py", "--config {work}/short_corpus.yaml", r"fewer than seq_len\+1 = 33 tokens: add text, lower training\.seq_len"),
    ("train.py", "--config {work}/missing_data.yaml", r"dataset file not found: .*missing\.txt \(check data\.dataset\)"),
    ("train.py", "--config {work}/hub_offline.yaml",
     r"nobody-has/this-dataset.*(offline|cache|local file|data\.dataset)"),
    ("train.py", "--config {work}/config.yaml --set hardware.accelerator=tpu",
     r"hardware\.accelerator must be auto, cpu, cuda, gpu or mps, got 'tpu'"),
    ("infer.py", "--ckpt {work}/nothing.ckpt --prompt Hi", r"checkpoint not found: .*nothing\.ckpt \(train one first"),
    ("infer.py", "--ckpt {work}/truncated.ckpt --prompt Hi", r"truncated.ckpt is not a readable checkpoint .*pick another"),
    ("infer.py", "--ckpt {work}/notes.ckpt --prompt Hi", r"notes.ckpt is not a readable checkpoint .*pick another"),
    ("infer.py", "--ckpt {work}/foreign.ckpt --prompt Hi", r"not a Tiny Transformer checkpoint .*use a \.ckpt written by"),
    ("infer.py", "--ckpt {work}/small_vocab.ckpt --prompt Hi",
     r"tokenizer 'gpt2' has 50257 tokens but the checkpoint's model has only 256: use --tokenizer auto"),
    ("infer.py", "--ckpt {work}/model.ckpt --prompt Hi --temperature -1", r"--temperature must be >= 0"),
    ("infer.py", "--ckpt {work}/model.ckpt --prompt Hi --top-p 0", r"--top-p must be in \(0, 1\]"),
    ("infer.py", "--ckpt {work}/model.ckpt --prompt Hi --device cuda",
     r"device cuda is not available on this machine: use --device auto or cpu"),
    ("infer.py", "--ckpt {work}/model.ckpt", r"pass --prompt TEXT"),
    ("eval_val.py", "--ckpt {work}/truncated.ckpt", r"not a readable checkpoint"),
    ("eval_val.py", "--ckpt {work}/model.ckpt --set training.lrr=1", r"unknown config key 'training\.lrr'"),
    ("evaluate_checkpoints.py", "--checkpoints {work}/model.ckpt --cases {work}/cases_mapping.yaml",
     r"case file .*cases_mapping\.yaml must be a non-empty list of \{name, prompt, target\} entries"),
    ("evaluate_checkpoints.py", "--checkpoints {work}/model.ckpt --cases {work}/cases_unknown.yaml",
     r"entry 1 has unknown key\(s\) answer \(allowed: name, prompt, target\)"),
    ("evaluate_checkpoints.py", "--checkpoints {work}/none*.ckpt --cases cases/tiny_corpus.yaml",
     r"no checkpoint matches .*train one first"),
    ("finetune.py", "--config {work}/sft.yaml", r"no_output\.jsonl:6: record has no 'output' \(each record needs"),
    ("finetune.py", "--config {work}/sft_no_base.yaml", r"base checkpoint not found: .*make it with `python train\.py"),
    ("list.py", "--dir {work}/no_such_folder", r"checkpoint folder not found: .*\(train first, or pass --dir"),
    ("convert.py", "to-hf --ckpt {work}/model.ckpt --out {work}/hf_out",
     r"--out .*hf_out exists and is not empty: pick a new folder or pass --overwrite"),
    ("convert.py", "from-hf --model {work}/no_model --out {work}/imported.ckpt",
     r"--model .* is not a folder: download the model first"),
    ("convert.py", "from-hf --model {work}/hf_out --out {work}/model.ckpt",
     r"--out .*model\.ckpt exists: pick a new name or pass --overwrite"),
    ("convert.py", "to-gguf --ckpt {work}/model.ckpt --out {work}/model.ckpt",
     r"--out .*model\.ckpt exists: pick a new name or pass --overwrite"),
    ("convert.py", "to-gguf --ckpt {work}/model.ckpt --out {work}/hf_out",
     r"--out .*hf_out is a folder: give a file name"),
    ("convert.py", "to-gguf --ckpt {work}/model.ckpt --out {work}/no_folder/model.gguf",
     r"--out .*model\.gguf: folder .*no_folder does not exist: create it first"),
    ("convert.py", "to-gguf --ckpt {work}/swa.ckpt --out {work}/model.gguf",
     r"this model uses sliding-window attention \(swa_window 4\), which llama\.cpp's Llama architecture would "
     r"replace by full attention .*: export it with to-hf instead"),
    ("convert.py", "to-gguf --ckpt {work}/words.ckpt --out {work}/model.gguf",
     r"to-gguf writes byte-level BPE tokenizers .*words is a WordLevel tokenizer with pre-tokenizer None: use to-hf, "
     r"then llama\.cpp's convert_hf_to_gguf\.py"),
    # Config files (config.read_yaml): text, one value per key, a mapping of sections.
    ("train.py", "--config {work}/latin1.yaml", r"latin1\.yaml:2: not UTF-8 text \(byte 0xe9\): .*save it as UTF-8"),
    ("train.py", "--config {work}/binary.yaml", r"binary\.yaml:2: binary data \(a NUL byte\), not text"),
    ("train.py", "--config {work}/dup_key.yaml",
     r"duplicate key 'training\.lr' in .*dup_key\.yaml at line 4 \(first at line 2\): .*remove one"),
    ("train.py", "--config {work}/dup_section.yaml", r"duplicate key 'training' in .*dup_section\.yaml at line 5 \(first at line 1\)"),
    ("eval_val.py", "--ckpt {work}/model.ckpt --config {work}/dup_key.yaml", r"duplicate key 'training\.lr'"),
    ("train.py", "--config {work}/empty.yaml", r"empty\.yaml is empty: a config needs at least one section"),
    ("train.py", "--config {work}/list.yaml", r"list\.yaml must contain a mapping of sections"),
    # Data files and sources (sources.py): one line naming the file and the line, before any training.
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/latin1.txt",
     r"latin1\.txt:2: not UTF-8 text \(byte 0xe9\): save it as UTF-8"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/nul.txt",
     r"nul\.txt:1: binary data \(a NUL byte\), not text"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/list.jsonl --set data.val_docs=0",
     r"list\.jsonl:2: expected a JSON object with a 'text' field, got \[\"a\", \"list\"\]"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/number.jsonl --set data.val_docs=0",
     r"number\.jsonl:1: expected a JSON object with a 'text' field, got 3\.5"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/null_text.jsonl --set data.val_docs=0",
     r"null_text\.jsonl:2: field 'text' is null, not a string: fix the record, or set data\.text_field"),
    ("eval_val.py", "--ckpt {work}/model.ckpt --set data.dataset={work}/int_text.jsonl --set data.val_docs=1",
     r"int_text\.jsonl:1: field 'text' is 12, not a string"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/fake.parquet",
     r"fake\.parquet: not a readable parquet file \(.*\): check the file"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/*",
     r"data\.dataset pattern .* matches the folder .*: a pattern must match files"),
    ("train.py", "--config {work}/config.yaml --set data.dataset={work}/nothing*.csv",
     r"no file matches data\.dataset pattern .*nothing\*\.csv"),
    ("train.py", "--config {work}/config.yaml --set data.val_dataset={work}/notes",
     r"no data files \(\.txt, \.jsonl, \.json, \.parquet, \.csv\) in folder .*notes: check data\.val_dataset"),
    ("train.py", "--config {work}/config.yaml --set data.val_dataset={work}/short.txt --set data.dataset={work}/short.txt",
     r"data\.val_dataset is data\.dataset \(.*short\.txt\): validation would be training text"),
    ("eval_val.py", "--ckpt {work}/model.ckpt --split test",
     r"data\.val_split \(eval_val\.py --split\) names a split, but .* has no named splits .*: hold out documents"),
    ("finetune.py", "--config {work}/sft.yaml --set data.dataset={work}/sft_input.jsonl --set data.val_docs=1",
     r"sft_input\.jsonl:1: record has a non-string 'input' \(input is optional text"),
    ("finetune.py", "--config {work}/sft.yaml --set data.dataset={work}/sft_instruction.jsonl --set data.val_docs=1",
     r"sft_instruction\.jsonl:1: record has a non-string 'instruction'"),
    ("finetune.py", "--config {work}/sft.yaml --set data.dataset={work}/short.txt",
     r"short\.txt is plain text, not records: records come from \.jsonl/\.json/\.parquet/\.csv"),
    # Tokenizers: a damaged tokenizer.json, a folder that is not there; train_tokenizer.py's input and output.
    ("train.py", "--config {work}/config.yaml --set data.tokenizer_name={work}/bad_tok",
     r"bad_tok/tokenizer\.json is damaged or not a tokenizer file \(.*\): write it again"),
    ("train.py", "--config {work}/config.yaml --set data.tokenizer_name=./no_such_tokenizer",
     r"tokenizer folder \./no_such_tokenizer not found: name the folder that holds tokenizer\.json"),
    ("infer.py", "--ckpt {work}/model.ckpt --prompt Hi --tokenizer {work}/bad_tok", r"tokenizer\.json is damaged"),
    ("train_tokenizer.py", "--input {work}/latin1.txt --out {work}/new_tok", r"latin1\.txt:2: not UTF-8 text \(byte 0xe9\)"),
    ("train_tokenizer.py", "--input {work}/nul.txt --out {work}/new_tok", r"nul\.txt:1: binary data \(a NUL byte\)"),
    ("train_tokenizer.py", "--input {work}/short.txt --out {work}/bad_tok",
     r"--out .*bad_tok exists and is not empty: pick a new folder, or pass --overwrite"),
    ("train_tokenizer.py", "--input {work}/short.txt --out {work}/model.ckpt", r"--out .*model\.ckpt is a file: name a folder"),
    # Hardware, absurd numbers, the run folder (config.py validates them before anything starts).
    ("train.py", "--config {work}/config.yaml --set hardware.devices=0", r"hardware\.devices must be an integer >= 1 or auto, got 0"),
    ("train.py", "--config {work}/config.yaml --set hardware.num_workers=-1", r"hardware\.num_workers must be an integer >= 0, got -1"),
    ("train.py", "--config {work}/config.yaml --set hardware.strategy=horovod",
     r"hardware\.strategy must be auto, ddp, fsdp or deepspeed, got 'horovod'"),
    ("train.py", "--config {work}/config.yaml --set hardware.strategy=deepspeed",
     r"hardware\.strategy deepspeed needs the deepspeed package: pip install deepspeed"),
    ("train.py", "--config {work}/config.yaml --set training.optimizer=muon --set training.precision=16-mixed",
     r"training\.optimizer muon does not run with precision 16-mixed: use precision bf16-mixed or 32"),
    ("train.py", "--config {work}/config.yaml --set training.max_steps=100000000000000000000000",
     r"training\.max_steps is 100000000000000000000000: far beyond anything"),
    ("train.py", "--config {work}/config.yaml --set training.seed=-1", r"training\.seed must be an integer in \[0, 4294967296\), got -1"),
    ("train.py", "--config {work}/config.yaml --set training.precision=bf16",
     r"training\.precision must be auto, 32, bf16-mixed, 16-mixed or bf16-true, got 'bf16'"),
    ("train.py", "--config {work}/config.yaml --set training.max_steps=null",
     r"training\.max_steps is null \(no step limit\) but training\.max_time is not set: give max_steps, or max_time"),
    ("train.py", "--config {work}/config.yaml --set training.lr=.nan", r"training\.lr must be a finite number"),
    ("train.py", "--config {work}/config.yaml --set training.checkpoint_dir={work}/short.txt",
     r"training\.checkpoint_dir .*short\.txt is a file, not a folder"),
    ("train.py", "--config {work}/config.yaml --set training.loggers=[csv,wandb]",
     r"training\.loggers: wandb needs the wandb package: pip install wandb"),
    ("infer.py", "--ckpt {work}/model.ckpt --prompt Hi --temperature nan", r"--temperature must be a finite number, got nan"),
    ("infer.py", "--ckpt {work}/model.ckpt --prompt Hi --top-p inf", r"--top-p must be a finite number, got inf"),
    # Checkpoints whose meta is missing, malformed or inconsistent with the weights: every script that loads one.
    ("infer.py", "--ckpt {work}/no_meta.ckpt --prompt Hi", r"not a Tiny Transformer checkpoint \(no state_dict/meta\)"),
    ("infer.py", "--ckpt {work}/meta_list.ckpt --prompt Hi", r"meta_list\.ckpt: its meta does not describe a model"),
    ("eval_val.py", "--ckpt {work}/meta_broken.ckpt", r"meta_broken\.ckpt: its meta does not describe a model"),
    ("infer.py", "--ckpt {work}/mismatch.ckpt --prompt Hi", r"mismatch\.ckpt: the weights do not match the model its meta"),
    ("evaluate_checkpoints.py", "--checkpoints {work}/mismatch.ckpt --cases cases/tiny_corpus.yaml",
     r"mismatch\.ckpt: the weights do not match the model its meta describes"),
    ("finetune.py", "--config {work}/mismatch_sft.yaml --dry-run", r"mismatch\.ckpt: the weights do not match"),
    ("convert.py", "to-hf --ckpt {work}/mismatch.ckpt --out {work}/hf_new", r"mismatch\.ckpt: the weights do not match"),
    ("convert.py", "to-gguf --ckpt {work}/mismatch.ckpt --out {work}/m.gguf", r"mismatch\.ckpt: the weights do not match"),
    # Output files are checked before the work starts.
    ("list.py", "--dir {work} --plot {work}/no_folder/loss.png", r"--plot .*loss\.png: folder .*no_folder does not exist"),
    ("evaluate_checkpoints.py", "--checkpoints {work}/model.ckpt --cases cases/tiny_corpus.yaml --json {work}/no_folder/r.json",
     r"--json .*r\.json: folder .*no_folder does not exist: create it first"),
    # convert.py from-hf: broken model folders.
    ("convert.py", "from-hf --model {work}/hf_badjson --out {work}/imported.ckpt", r"hf_badjson/config\.json is not valid JSON"),
    ("convert.py", "from-hf --model {work}/hf_zero_heads --out {work}/imported.ckpt",
     r"config\.json: num_attention_heads must be a positive integer, got 0"),
    ("convert.py", "from-hf --model {work}/hf_no_width --out {work}/imported.ckpt",
     r"config\.json: hidden_size must be a positive integer, got None"),
    ("convert.py", "from-hf --model {work}/hf_corrupt --out {work}/imported.ckpt --tokenizer gpt2",
     r"model\.safetensors is not a readable weights file .*incomplete or damaged"),
    ("convert.py", "from-hf --model {work}/hf_index --out {work}/imported.ckpt --tokenizer gpt2",
     r"model\.safetensors\.index\.json has no weight_map"),
    ("convert.py", "from-hf --model {work}/hf_pickle --out {work}/imported.ckpt --tokenizer gpt2",
     r"pytorch_model\.bin holds Python objects beyond tensors; refusing to load it"),
]


PROGRESS = re.compile(r"^(train|val) tokens: [\d,]+ (tokenized and cached in|from cache) ")  # data.py's cache notes


def snapshot(folder) -> dict:
    """Path -> content hash of every file under folder: a row must leave this unchanged."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_in_process(script: str, argv: list[str], capsys) -> tuple[int, str]:
    def main():
        return SCRIPTS[script].main(argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script, args, pattern", [
    pytest.param(*row, marks=pytest.mark.skipif("cuda" in row[1] and torch.cuda.is_available(),
                                                reason="this row expects a machine without a GPU"))
    for row in ROWS], ids=[f"{r[0]} {r[1]}" for r in ROWS])
def test_bad_input_gives_one_line_and_exit_2(work, capsys, script, args, pattern):
    before = snapshot(work)
    code, err = run_in_process(script, args.format(work=work).split(), capsys)
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(work) == before  # nothing written, changed or deleted


@pytest.mark.parametrize("script, args", [
    ("train.py", "--config {work}/unknown_key.yaml"),
    ("infer.py", "--ckpt {work}/truncated.ckpt --prompt Hi"),
    ("evaluate_checkpoints.py", "--checkpoints {work}/model.ckpt --cases {work}/cases_mapping.yaml"),
])
def test_real_processes_exit_2_without_a_traceback(work, script, args):
    before = snapshot(work)
    result = run_script(script, *args.format(work=work).split(), check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(work) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_training_asked_for_cuda_without_a_gpu_falls_back_with_a_warning(capsys):
    """train.py is lenient (hardware.accelerator: cuda runs on the CPU, saying so); infer.py's --device is strict."""
    assert pick_device("cuda", strict=False) == torch.device("cpu")
    assert "warning: cuda is not available on this machine; using cpu instead" in capsys.readouterr().out
    with pytest.raises(cli.UsageError, match="device cuda is not available"):
        pick_device("cuda", strict=True)


def test_every_message_is_documented():
    """Each row's script has its messages in docs/TROUBLESHOOTING.md (by a distinctive fragment)."""
    text = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()
    for fragment in ["config file not found", "YAML syntax error", "unknown config key", "must be bool", "must be ALLOWED, got VALUE", "max_time is not set: give max_steps",
                     "must be divisible by model.n_heads", "must be divisible by model.n_kv_heads", "exceeds model.max_seq_len",
                     "fewer than seq_len+1", "dataset file not found", "checkpoint not found",
                     "is not a readable checkpoint", "not a Tiny Transformer checkpoint",
                     "refusing to load it", "tokens but the checkpoint's model has only", "--temperature must be",
                     "--top-p must be in", "is not available on this machine", "must be a non-empty list",
                     "record has no 'output'", "base checkpoint not found", "checkpoint folder not found",
                     "exists and is not empty", "exists: pick a new name", "does not exist: create it first", "is a folder: give a file name",
                     "this model uses sliding-window attention", "to-gguf writes byte-level BPE tokenizers",
                     "not UTF-8 text", "binary data (a NUL byte)", "duplicate key",
                     "is empty: a config needs at least one section", "must contain a mapping of sections",
                     "expected a JSON object with a 'text' field", "not a string: fix the record",
                     "not a readable parquet file", "a pattern must match files", "no file matches data.dataset pattern",
                     "no data files (.txt, .jsonl, .json, .parquet, .csv) in folder", "names a split, but",
                     "record has a non-string 'input'", "is plain text, not records", "not valid JSON",
                     "is damaged or not a tokenizer file", "tokenizer folder", "not found in the local cache (offline mode)",
                     "is a file: name a folder", "token cache", "has N documents, not more than data.val_docs",
                     "cannot read PATH", "data.val_dataset is data.dataset", "not cached: cannot write",
                     "in the local cache but incomplete",
                     "is corrupted (the bytes of", "its meta does not describe a model",
                     "the weights do not match the model its meta describes", "is not the one this checkpoint was trained with",
                     "is in use by another run", "is a file, not a folder", "needs CUDA GPUs", "must be an integer >= 1 or auto",
                     "needs the wandb package", "must be a finite number", "far beyond anything this project can run",
                     "does not compute: exporting it would give", "is not valid JSON", "must be a positive integer, got N",
                     "is not a readable weights file", "has no weight_map", "refusing to load it because unpickling",
                     "no space left on device while writing", "out of memory", "it was trained with another tokenizer"]:
        assert fragment in text, fragment
