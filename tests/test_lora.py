"""lora.py and finetune.lora: the adapters start at the base and are all that trains, merging changes nothing,
PEFT's own library computes our logits from our exported adapters, a LoRA run resumes bit for bit, its
checkpoints load merged everywhere, and bad settings or adapters fail in one line.

The base model is the tiny_ckpt fixture (a 6-step tiny pretraining run shared by the session).
"""

import json

import pytest
import torch
import yaml

import convert
import finetune
import training
from checkpoint import load_checkpoint, read_meta, save_checkpoint
from cli import UsageError
from config import Training
from conftest import ROOT, TINY_CONFIG
from infer import load_model
from lora import LoRALinear, add_lora, merge_lora, merge_state_dict
from model import ModelConfig, Transformer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=32, max_seq_len=16)


def lora_model(seed=0, rank=4, alpha=8.0, targets=ALL, config=SMALL):
    """A random model with LoRA on `targets`, B made random too (B = 0 at the start would hide a wrong merge)."""
    torch.manual_seed(seed)
    model = add_lora(Transformer(config), rank, alpha, 0.0, targets)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
    return model.eval()


def lora_config(folder, base, lora, **training_settings):
    """A tiny SFT config on data/tiny_instructions.jsonl with a finetune.lora section."""
    config = {
        "finetune": {"base_checkpoint": str(base), "lora": lora},
        "training": {**TINY_CONFIG["training"], "checkpoint_dir": str(folder / "sft"), "lr": 1e-2,
                     **training_settings},
        "data": {"dataset": str(ROOT / "data" / "tiny_instructions.jsonl"), "val_docs": 20},
    }
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------------------------
# The adapters
# ---------------------------------------------------------------------------------------------


def test_an_adapted_model_starts_equal_to_its_base_and_trains_only_the_adapters():
    torch.manual_seed(0)
    base = Transformer(SMALL).eval()
    adapted = add_lora(Transformer(SMALL), 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    adapted.load_state_dict(base.state_dict(), strict=False)  # the base's weights; A random, B zero
    idx = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(adapted.eval()(idx), base(idx), rtol=0, atol=0)

    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[3] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    assert adapted.blocks[0].attn.q_proj.lora_A.weight.abs().sum() > 0  # A random (Kaiming), B zero
    assert not adapted.blocks[0].attn.q_proj.lora_B.weight.any()
    optimizers, _ = training.make_optimizers(adapted, Training())
    in_optimizer = [p for group in optimizers["adamw"].param_groups for p in group["params"]]
    assert sum(p.numel() for p in in_optimizer) == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    # the state dict keeps the base's names and adds the adapters beside them
    assert set(base.state_dict()) < set(adapted.state_dict())


def test_merged_equals_unmerged_for_the_model_and_for_its_state_dict():
    model = lora_model()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        unmerged = model(idx)
        settings = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ALL}
        plain = Transformer(SMALL).eval()
        plain.load_state_dict(merge_state_dict(model.state_dict(), settings, "test"))  # strict: a plain Transformer
        torch.testing.assert_close(plain(idx), unmerged)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert set(model.state_dict()) == set(plain.state_dict())
        torch.testing.assert_close(model(idx), unmerged)
    assert (unmerged - Transformer(SMALL).eval()(idx)).abs().max() > 1e-3  # the adapters do change the model


def test_gradient_checkpointing_gives_a_lora_model_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = lora_model(config=ModelConfig(**{**vars(SMALL), "gradient_checkpointing": checkpointing})).train()
        torch.manual_seed(1)
        model(torch.randint(0, 64, (2, 12))).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_a_target_the_model_lacks_is_refused_in_one_line():
    relu2 = ModelConfig(**{**vars(SMALL), "mlp": "relu2"})
    with pytest.raises(UsageError, match=r"targets names \['gate_proj'\], which this model does not have"):
        add_lora(Transformer(relu2), 4, 8.0, 0.0, ["q_proj", "gate_proj"])


# ---------------------------------------------------------------------------------------------
# PEFT's format: parity with the peft library
# ---------------------------------------------------------------------------------------------


def test_peft_computes_our_logits_from_the_exported_base_and_adapters(tiny_ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = load_checkpoint(str(tiny_ckpt))
    config = ModelConfig(**base["meta"]["model_config"])
    torch.manual_seed(0)
    ours = add_lora(Transformer(config), 4, 8.0, 0.1, ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])
    ours.load_state_dict(base["state_dict"], strict=False)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    settings = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]}
    lora_ckpt = tmp_path / "lora.ckpt"
    save_checkpoint({"state_dict": ours.state_dict(), "tokenizer": base["tokenizer"],
                     "meta": {**base["meta"], "lora": settings}}, str(lora_ckpt))

    assert convert.main(["to-hf", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "base_hf")]) == 0
    assert convert.main(["to-peft", "--ckpt", str(lora_ckpt), "--out", str(tmp_path / "adapter")]) == 0
    assert convert.main(["to-hf", "--ckpt", str(lora_ckpt), "--out", str(tmp_path / "merged_hf")]) == 0  # merged

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        expected = ours.eval()(idx)
        assert (expected - load_model(str(tiny_ckpt))[0](idx)).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(theirs(idx).logits, expected)  # unmerged, peft's LoRA layers
        torch.testing.assert_close(theirs.merge_and_unload()(idx).logits, expected, rtol=1e-4, atol=1e-4)
        merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", attn_implementation="eager")
        torch.testing.assert_close(merged_hf(idx).logits, expected, rtol=1e-4, atol=1e-4)  # to-hf merged ours
        torch.testing.assert_close(load_model(str(lora_ckpt))[0](idx), expected, rtol=1e-4, atol=1e-4)

    # ...and back: from-peft on our base gives the same checkpoint, the same logits.
    back = tmp_path / "back.ckpt"
    assert convert.main(["from-peft", "--base", str(tiny_ckpt), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(back)]) == 0
    assert read_meta(str(back))["lora"] == {**settings, "targets": sorted(settings["targets"])}
    again = load_checkpoint(str(back), merge_lora=False)["state_dict"]
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)


def test_adapters_peft_config_names_what_we_do_not_compute_in_one_line(tiny_ckpt, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match=r"uses use_dora=True, which lora\.py does not compute"):
        convert.main(["from-peft", "--base", str(tiny_ckpt), "--adapter", str(adapter), "--out", str(tmp_path / "x.ckpt")])
    with pytest.raises(UsageError, match="is not a LoRA checkpoint"):
        convert.main(["to-peft", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out")])


def test_an_adapter_of_another_base_is_refused(tiny_ckpt, tmp_path):
    from lora import save_peft

    wrong = lora_model(rank=4, targets=["q_proj"])  # d_model 16, the tiny run's is 32
    save_peft({k: v for k, v in wrong.state_dict().items() if ".lora_" in k},
              {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj"]}, str(tmp_path / "adapter"))
    with pytest.raises(UsageError, match="does not fit .*use the adapter trained on this base"):
        convert.main(["from-peft", "--base", str(tiny_ckpt), "--adapter", str(tmp_path / "adapter"),
                      "--out", str(tmp_path / "x.ckpt")])


# ---------------------------------------------------------------------------------------------
# finetune.py with finetune.lora
# ---------------------------------------------------------------------------------------------


def test_a_lora_run_trains_only_its_adapters_and_every_script_gets_the_merged_model(tiny_ckpt, tmp_path, capsys):
    config = lora_config(tmp_path, tiny_ckpt, {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"]})
    assert finetune.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("LoRA rank 4"))
    n_lora = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 64))  # per layer: A (4 x in) + B (out x 4), 2 layers
    n_base = read_meta(str(tiny_ckpt))["n_params"]
    assert f"on q_proj, v_proj, up_proj: {n_lora:,} trainable of {n_base + n_lora:,} parameters" in line
    assert "memory: weights" in line and "gradients + AdamW moments" in line

    folder = tmp_path / "sft"
    periodic = load_checkpoint(str(folder / "epoch=0-step=6.ckpt"), merge_lora=False)
    base = load_checkpoint(str(tiny_ckpt))["state_dict"]
    for name, tensor in base.items():  # the base stayed frozen
        torch.testing.assert_close(periodic["state_dict"][name], tensor, rtol=0, atol=0, msg=name)
    state = periodic["adamw"]["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == n_lora  # AdamW's moments: the adapters only
    assert periodic["meta"]["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj", "up_proj"]}

    final = load_checkpoint(str(folder / "final.ckpt"))  # merged as it loads: a plain Transformer
    assert set(final["state_dict"]) == set(base) and final["meta"]["merged_lora"]["rank"] == 4
    changed = [n for n in base if not torch.equal(final["state_dict"][n], base[n])]
    assert changed and all(n.rsplit(".", 2)[-2] in ("q_proj", "v_proj", "up_proj") for n in changed)
    model, _ = load_model(str(folder / "final.ckpt"))
    assert type(model.blocks[0].attn.q_proj) is torch.nn.Linear


def test_a_lora_run_resumes_bit_for_bit_after_a_crash(tiny_ckpt, tmp_path, monkeypatch):
    from test_train import crash_at_step

    lora = {"rank": 4, "alpha": 8, "dropout": 0.2, "targets": ALL}  # dropout: the random state must resume too
    settings = {"max_steps": 8, "val_every": 4, "log_every": 1, "save_every": 4}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    assert finetune.main(["--config", str(lora_config(straight, tiny_ckpt, lora, **settings))]) == 0
    config = lora_config(crashed, tiny_ckpt, lora, **settings)
    with monkeypatch.context() as m:
        crash_at_step(m, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            finetune.main(["--config", str(config)])
    assert finetune.main(["--config", str(config)]) == 0  # resumes from step 4

    expected = load_checkpoint(str(straight / "sft" / "final.ckpt"), merge_lora=False)["state_dict"]
    got = load_checkpoint(str(crashed / "sft" / "final.ckpt"), merge_lora=False)["state_dict"]
    assert any(".lora_B." in name for name in got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_resuming_with_another_lora_setting_is_refused(tiny_ckpt, tmp_path):
    config = lora_config(tmp_path, tiny_ckpt, {"rank": 4}, max_steps=2, save_every=2)
    assert finetune.main(["--config", str(config)]) == 0
    for change, says in (("finetune.lora=null", "it is a LoRA rank 4 \\(alpha 16\\) on q_proj, .* checkpoint, the "
                                                "config says full fine-tuning"),
                         ("finetune.lora.rank=8", "the config says LoRA rank 8")):
        with pytest.raises(UsageError, match=f"cannot resume from .*{says}"):
            finetune.main(["--config", str(config), "--set", "training.max_steps=4", "--set", change])


def test_lora_config_mistakes_are_one_line(tiny_ckpt, tmp_path):
    for lora, extra, says in (({"targets": []}, {}, "finetune.lora.targets is empty"),
                              ({"rank": 0}, {}, "finetune.lora.rank must be an integer >= 1"),
                              ({"targets": ["qproj"]}, {}, "finetune.lora.targets\\[0\\] must be q_proj"),
                              ({}, {"optimizer": "muon"}, "training.optimizer muon with finetune.lora")):
        with pytest.raises(UsageError, match=says):
            finetune.load_finetune_config(lora_config(tmp_path, tiny_ckpt, lora, **extra))
