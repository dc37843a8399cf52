"""The CUDA path, exercised rather than assumed: run on a machine with a GPU, skipped (with the reason) elsewhere.

The model in bf16 through SDPA's flash kernel against the fp32 CPU model, the KV cache on the GPU, a short
training run on CUDA in bf16-mixed whose checkpoint loads on the CPU, and greedy decoding on the GPU.

    python -m pytest -q tests/test_cuda.py
"""

import pytest
import torch

from conftest import write_config
from model import KVCache, ModelConfig, Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def tiny_model(**overrides) -> Transformer:
    fields = dict(vocab_size=128, n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=128)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**fields, **overrides})).eval()


@pytest.mark.parametrize("swa_window", [0, 16])
def test_bf16_on_the_gpu_matches_fp32_on_the_cpu(swa_window):
    """head_dim 32 and bf16 are what the flash kernel takes; with a window SDPA gets a boolean mask instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cpu = tiny_model(swa_window=swa_window)
    gpu = tiny_model(swa_window=swa_window).to("cuda", torch.bfloat16)
    idx = torch.randint(0, 128, (2, 64))
    backends = [SDPBackend.FLASH_ATTENTION] if not swa_window else [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.no_grad(), sdpa_kernel(backends):
        ours = gpu(idx.cuda()).float().cpu()
    reference = cpu(idx)
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 has 8 bits of mantissa
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95


def test_kv_cache_on_the_gpu_equals_the_full_forward():
    model = tiny_model().cuda()
    idx = torch.randint(0, 128, (1, 40), device="cuda")
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 1, device="cuda")
        steps = [model(idx[:, :25], cache)] + [model(idx[:, t:t + 1], cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_training_on_cuda_in_bf16_and_the_checkpoint_loads_on_the_cpu(tmp_path):
    import train
    from checkpoint import read_meta
    from infer import load_model

    config = write_config(tmp_path, {"hardware": {"accelerator": "cuda"}, "training": {"precision": "bf16-mixed"}})
    assert train.main(["--config", str(config)]) == 0
    meta = read_meta(str(tmp_path / "checkpoints" / "final.ckpt"))
    assert meta["step"] == 6 and meta["val_loss"] < 11.0
    model, _ = load_model(str(tmp_path / "checkpoints" / "final.ckpt"), "cpu")
    assert next(model.parameters()).device.type == "cpu"
    # and it resumes on the GPU
    assert train.main(["--config", str(config), "--set", "training.max_steps=8"]) == 0
    assert read_meta(str(tmp_path / "checkpoints" / "final.ckpt"))["step"] == 8


def test_greedy_decoding_on_the_gpu_equals_the_cpu():
    import infer

    cpu, gpu = tiny_model(), tiny_model().cuda()
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    prompt = torch.randint(0, 128, (12,)).tolist()
    ours = [t.item() for t, _ in infer.generate(gpu, prompt, 20, greedy, [torch.Generator()])]
    reference = [t.item() for t, _ in infer.generate(cpu, prompt, 20, greedy, [torch.Generator()])]
    assert ours == reference
