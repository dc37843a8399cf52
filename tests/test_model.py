"""Tests for model.py. Each test doubles as an example of how to use the model.

Everything runs on CPU in fp32 from random weights (no downloads); the whole file takes a few seconds.

    pytest tests/test_model.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from convert import hf_config_kwargs, to_hf_state_dict  # the one name/config mapping, shared with the converter
from model import KVCache, ModelConfig, Transformer, apply_rope, attention_mask, rope_cos_sin

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough to run dozens of times per second; GQA (4 query heads, 2 K/V heads) by default."""
    fields = dict(vocab_size=101, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def build(config: ModelConfig, seed: int = 0, scale: float = 0.0) -> Transformer:
    """Seeded model in eval mode. scale > 0 redraws every parameter (RMSNorm gains included) with that std
    around its init, so a swapped norm or a mis-mapped weight cannot hide behind gains of exactly 1."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    return model


# ---------------------------------------------------------------- Hugging Face parity


def hf_copy(model: Transformer, hf_class, **config_kwargs):
    """Build `hf_class` (e.g. LlamaForCausalLM) with the same dims and weights as `model`.

    attn_implementation="eager": HF's plain matmul-softmax-matmul path with an explicit additive mask,
    an independent reference for our SDPA call.
    """
    config_class = transformers.MistralConfig if hf_class is transformers.MistralForCausalLM else transformers.LlamaConfig
    hf_config = config_class(**hf_config_kwargs(model.config), **config_kwargs)
    hf_config._attn_implementation = "eager"
    hf = hf_class(hf_config).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    if model.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


@pytest.mark.parametrize("n_heads, n_kv_heads, tie", [
    (4, 4, True),  # MHA
    (4, 2, True),  # GQA
    (4, 1, True),  # MQA
    (4, 2, False),  # GQA, separate output head
    (4, 4, False),  # MHA, separate output head
], ids=["mha-tied", "gqa-tied", "mqa-tied", "gqa-untied", "mha-untied"])
def test_logits_match_hf_llama(n_heads, n_kv_heads, tie):
    """Our Transformer is a LlamaForCausalLM: same weights in, same logits out (default fp32 tolerances)."""
    config = tiny_config(n_heads=n_heads, n_kv_heads=n_kv_heads, tie_embeddings=tie,
                         rope_theta=500.0, norm_eps=1e-6)  # non-default values, so a dropped field would show
    model = build(config, scale=0.1)
    hf = hf_copy(model, transformers.LlamaForCausalLM, attention_bias=False, mlp_bias=False)
    idx = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits)


def test_sliding_window_matches_hf_mistral():
    """Our swa_window == Mistral's sliding_window, off-by-none.

    transformers 5 (masking_utils.sliding_window_overlay) lets query i see key j iff
    i - sliding_window < j <= i: the query itself plus the sliding_window - 1 keys before it, i.e.
    exactly `sliding_window` keys. That is our rule too (see attention_mask), so a convert script
    copies the value unchanged. The sequence here is several windows long, so the window bites.
    """
    window = 5
    config = tiny_config(swa_window=window)
    model = build(config, scale=0.1)
    hf = hf_copy(model, transformers.MistralForCausalLM, sliding_window=window)
    idx = torch.randint(0, config.vocab_size, (2, 6 * window))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
        torch.testing.assert_close(ours, theirs)
        # A window of window + 1 must NOT match: the test can tell an off-by-one apart.
        hf.config.sliding_window = window + 1
        assert not torch.allclose(ours, hf(idx).logits, atol=1e-4)


# ---------------------------------------------------------------- the vocabulary and its padding


@pytest.mark.parametrize("vocab, rows", [(101, 128), (1024, 1024), (50257, 50304), (64, 64), (65, 128)])
def test_the_model_pads_its_rows_and_returns_logits_of_the_vocabulary_only(vocab, rows):
    """vocab_size is the tokenizer's; the embedding and head hold a multiple of 64 rows; logits cover vocab_size."""
    config = tiny_config(vocab_size=vocab, d_model=16, n_heads=2, n_kv_heads=1, n_layers=1)
    assert config.padded_vocab_size == rows
    for tie in (True, False):
        with torch.device("meta"):
            model = Transformer(ModelConfig(**{**vars(config), "tie_embeddings": tie}))
        assert model.embed.weight.shape == model.lm_head.weight.shape == (rows, 16)
        assert model(torch.zeros(2, 3, dtype=torch.long, device="meta")).shape == (2, 3, vocab)


def test_padding_rows_never_reach_a_logit_nor_a_gradient():
    """Rows past vocab_size can hold anything: the logits and the real rows' gradients do not change."""
    model = build(tiny_config(vocab_size=101, tie_embeddings=False), scale=0.1)
    idx = torch.randint(0, 101, (2, 12))
    before = model(idx)
    with torch.no_grad():
        model.lm_head.weight[101:] = 1e4
        model.embed.weight[101:] = float("nan")  # never looked up: ids are < vocab_size
    after = model(idx)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    F.cross_entropy(after.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    assert torch.all(model.lm_head.weight.grad[101:] == 0)


@pytest.mark.parametrize("flags", [{}, {"tie_embeddings": False, "n_kv_heads": 4}, {"mlp": "relu2"},
                                   {"qk_norm": True, "logit_softcap": 3.0}, {"n_kv_heads": 1, "swa_window": 3}])
def test_decode_weights_give_the_same_logits_and_tokens_and_leave_the_model_as_it_was(flags):
    """forward(decode=model.decode_weights()) = forward(): full sequence, prefill + one token at a time through
    the KV cache, and greedy ids; for every variant the layout covers. The module is never changed."""
    model = build(tiny_config(vocab_size=101, **flags), scale=0.5)
    modules, weights = dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}
    decode = model.decode_weights()
    c = model.config
    assert decode.head.shape == (c.d_model, c.vocab_size) and decode.head.is_contiguous()
    qkv_width, up_width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.d_ff * (2 if c.mlp == "swiglu" else 1)
    assert [tuple(w.shape) for w in decode.blocks[0]] == [(c.d_model, qkv_width), (c.d_model, c.d_model),
                                                          (c.d_model, up_width), (c.d_ff, c.d_model)]
    idx = torch.randint(0, 101, (2, 12))
    cache = KVCache(c, batch_size=2)
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, decode=decode), full, rtol=1e-5, atol=1e-5)
        steps = [model(idx[:, :4], cache, decode=decode)] + [model(idx[:, t:t + 1], cache, decode=decode)
                                                            for t in range(4, 12)]
        # Logits of size ~10 summed in another order: the plain cached path differs from the full forward alike.
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy_cached(model, idx[:1, :5], 20, decode), greedy_uncached(model, idx[:1, :5], 20))
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(not w.data_ptr() == p.data_ptr() for w in decode.blocks[0] for p in model.parameters())


# ---------------------------------------------------------------- attention masking


def reference_attention(attn, x, window: int):
    """What one Attention module should compute, written out naively with an explicit mask."""
    B, T, _ = x.shape
    cos, sin = rope_cos_sin(torch.arange(T), attn.head_dim, 10000.0)
    q = apply_rope(attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim), cos, sin).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    groups = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # query head h uses K/V head h // groups
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, H, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & ((j > i - window) if window else True)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return attn.o_proj((weights @ v).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("window", [0, 1, 3, 7, 40])
def test_attention_matches_naive_masked_reference(window):
    """One attention layer (window 0 = full causal; 1 = each token sees only itself; 40 >= T = no-op window)."""
    config = tiny_config(swa_window=window)
    model = build(config, scale=0.1)
    attn = model.blocks[0].attn
    x = torch.randn(2, 20, config.d_model)
    cos, sin = rope_cos_sin(torch.arange(20), config.head_dim, config.rope_theta)
    mask = attention_mask(0, 20, 20, window, x.device)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, mask), reference_attention(attn, x, window))


def as_bool_mask(mask, q_len: int, k_len: int) -> torch.Tensor:
    """attention_mask's three return forms, spelled out as a (q_len, k_len) bool matrix."""
    if mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool)
    if isinstance(mask, str):
        assert mask == "causal" and q_len == k_len
        return torch.ones(q_len, k_len, dtype=torch.bool).tril()
    return mask


@pytest.mark.parametrize("window", [0, 1, 2, 4, 9])
@pytest.mark.parametrize("q_start, q_len", [(0, 1), (0, 6), (0, 9), (3, 1), (3, 4), (8, 1), (5, 7), (11, 1)])
def test_attention_mask_follows_the_rule(q_start, q_len, window):
    """Query at absolute position i sees key j iff i - window < j <= i (window 0: j <= i), checked entry by entry.

    The queries are always the newest q_len positions of the k_len keys, as in training (q_start 0)
    and in cached prefill/decoding (q_start = tokens already cached).
    """
    k_len = q_start + q_len
    got = as_bool_mask(attention_mask(q_start, q_len, k_len, window, "cpu"), q_len, k_len)
    want = torch.tensor([[j <= i and (window == 0 or j > i - window) for j in range(k_len)]
                         for i in range(q_start, q_start + q_len)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("window", [0, 4])
def test_later_tokens_never_change_earlier_logits(window):
    """Causality: editing token t leaves the logits at positions < t untouched, and changes position t."""
    config = tiny_config(swa_window=window)
    model = build(config, scale=0.1)
    idx = torch.randint(0, config.vocab_size, (1, 24))
    edited = idx.clone()
    edited[0, 15] = (idx[0, 15] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(edited)
    torch.testing.assert_close(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15], after[:, 15])


def test_one_sliding_window_layer_sees_exactly_window_tokens():
    """With a single layer, position i depends on tokens i - w + 1 ... i only (stacked layers reach further)."""
    window = 4
    config = tiny_config(n_layers=1, swa_window=window)
    model = build(config, scale=0.1)
    idx = torch.randint(0, config.vocab_size, (1, 24))
    edited = idx.clone()
    edited[0, 10] = (idx[0, 10] + 1) % config.vocab_size
    with torch.no_grad():
        diff = (model(idx) - model(edited)).abs().amax(-1)[0]  # (T,) largest logit change per position
    assert torch.all(diff[:10] == 0)
    assert torch.all(diff[10:10 + window] > 1e-4)  # token 10 is inside the window of positions 10..13
    assert torch.all(diff[10 + window:] == 0)  # and outside it from position 14 on


# ---------------------------------------------------------------- KV cache


CACHE_CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa-swa": dict(n_heads=4, n_kv_heads=1, swa_window=5),
    "gqa-swa": dict(n_heads=4, n_kv_heads=2, swa_window=3),
}


@pytest.mark.parametrize("prompt_len", [1, 4, 12])
@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_cached_decoding_matches_full_forward(name, prompt_len):
    """Prefill a prompt, then feed one token at a time: the logits are those of one full forward.

    prompt_len 12 is longer than both sliding windows, so the cache must mask old keys itself.
    """
    config = tiny_config(**CACHE_CONFIGS[name])
    model = build(config, scale=0.1)
    idx = torch.randint(0, config.vocab_size, (1, 20))
    cache = KVCache(config, batch_size=1)
    with torch.no_grad():
        full = model(idx)
        steps = [model(idx[:, :prompt_len], cache)]  # prefill
        for t in range(prompt_len, idx.shape[1]):
            steps.append(model(idx[:, t:t + 1], cache))  # one new token, attending to the cache
    assert cache.length == idx.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "gqa-swa"])
def test_cache_accepts_chunks(name):
    """Several tokens at a time after a prefill (speculative decoding, chunked prefill) also match."""
    config = tiny_config(**CACHE_CONFIGS[name])
    model = build(config, scale=0.1)
    idx = torch.randint(0, config.vocab_size, (1, 20))
    cache = KVCache(config, batch_size=1)
    with torch.no_grad():
        chunks = [model(idx[:, a:b], cache) for a, b in [(0, 7), (7, 8), (8, 13), (13, 20)]]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def greedy_cached(model, prompt, n_new, decode=None):
    cache = KVCache(model.config, batch_size=prompt.shape[0])
    logits = model(prompt, cache, decode=decode)
    out = prompt
    for _ in range(n_new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        logits = model(nxt, cache, decode=decode)
    return out


@torch.no_grad()
def greedy_uncached(model, prompt, n_new):
    out = prompt
    for _ in range(n_new):
        out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("name", ["gqa", "gqa-swa"])
def test_greedy_generation_same_with_and_without_cache(name):
    config = tiny_config(**CACHE_CONFIGS[name])
    model = build(config, scale=0.1)
    prompt = torch.randint(0, config.vocab_size, (1, 6))
    assert torch.equal(greedy_cached(model, prompt, 25), greedy_uncached(model, prompt, 25))


def test_batch_of_two_equals_two_single_runs():
    """Rows of a batch are independent, with and without the cache."""
    config = tiny_config(**CACHE_CONFIGS["gqa-swa"])
    model = build(config, scale=0.1)
    prompts = torch.randint(0, config.vocab_size, (2, 6))
    with torch.no_grad():
        both = model(prompts)
        for b in range(2):
            torch.testing.assert_close(both[b:b + 1], model(prompts[b:b + 1]))
    batched = greedy_cached(model, prompts, 10)
    for b in range(2):
        assert torch.equal(batched[b:b + 1], greedy_cached(model, prompts[b:b + 1], 10))


def test_cache_refuses_to_overflow():
    config = tiny_config(max_seq_len=8)
    model = build(config)
    cache = KVCache(config, batch_size=1)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)


# ---------------------------------------------------------------- training


def test_gradient_checkpointing_gives_same_gradients():
    """Recomputing activations in backward trades time for memory; the gradients stay the same."""
    config = tiny_config(swa_window=6)
    idx = torch.randint(0, config.vocab_size, (2, 16))

    def grads(checkpointing: bool):
        model = build(config, scale=0.1).train()
        model.config.gradient_checkpointing = checkpointing
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("n_layers", -1), ("d_model", 0), ("n_heads", 0), ("n_kv_heads", 0), ("d_ff", 0),
    ("max_seq_len", 0), ("n_layers", 2.5), ("d_model", True),
    ("d_model", 66),  # not divisible by n_heads = 4
    ("d_model", 36),  # head_dim 9: odd, RoPE rotates pairs
    ("n_kv_heads", 3),  # 4 query heads cannot be split into 3 groups
    ("n_kv_heads", 8),  # more K/V heads than query heads
    ("dropout", 1.0), ("dropout", -0.1),
    ("swa_window", -1), ("swa_window", 2.0),
    ("rope_theta", 0.0), ("norm_eps", 0.0), ("norm_eps", -1e-5),
])
def test_bad_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        tiny_config(**{field: value})


def test_init_std_and_initial_loss():
    """Documented init: Linear/embedding std 0.02; o_proj and down_proj (which write into the residual
    stream) std 0.02 / sqrt(2 * n_layers). An untrained model then predicts ~uniformly: loss ~ ln(vocab)."""
    config = tiny_config(vocab_size=512, n_layers=4, d_model=128, d_ff=352)
    model = build(config, seed=1)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            want = residual_std
        elif name.endswith("norm.weight"):
            assert torch.all(p == 1), name
            continue
        else:
            want = 0.02
        assert abs(p.std().item() - want) < 0.05 * want, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.1 * want, name
    idx = torch.randint(0, config.vocab_size, (4, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    # Slightly above ln(vocab): with tied embeddings each position's own input token gets logit
    # ~ sqrt(d_model) * |e| ~ 2.6, which takes a little probability from the (random) true next token.
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1


def test_parameter_and_flop_counts():
    """num_parameters counts a tied matrix once; flops_per_token = 6 x matmul weights + attention."""
    for tie in (True, False):
        config = tiny_config(tie_embeddings=tie)
        model = build(config)
        c = config
        per_block = (2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim
                     + 3 * c.d_model * c.d_ff + 2 * c.d_model)
        body = c.n_layers * per_block + c.d_model  # + final norm
        rows = c.padded_vocab_size * c.d_model  # what the embedding and the head hold
        head = c.vocab_size * c.d_model  # what the head multiplies by: the real vocabulary's rows
        assert model.num_parameters(exclude_embeddings=True) == body + (0 if tie else rows)
        assert model.num_parameters() == body + rows * (1 if tie else 2)
        assert model.flops_per_token(32) == 6 * (body + head) + 12 * c.n_layers * c.d_model * 32


# ---------------------------------------------------------------- departures from the Llama recipe (model.* flags)


def test_logit_softcap_bounds_the_logits_and_keeps_their_order():
    plain = build(tiny_config(), scale=0.5)
    idx = torch.randint(0, 101, (2, 9))
    raw = plain(idx).detach()
    cap = raw.abs().max().item() / 2  # half the largest logit: the cap visibly bites
    capped = Transformer(tiny_config(logit_softcap=cap)).eval()
    capped.load_state_dict(plain.state_dict())
    soft = capped(idx)
    assert soft.abs().max() < cap
    torch.testing.assert_close(soft, cap * torch.tanh(raw / cap))
    assert torch.equal(raw.argmax(-1), soft.argmax(-1))


@pytest.mark.parametrize("flags", [{"mlp": "relu2"}, {"qk_norm": True}, {"logit_softcap": 15.0},
                                   {"mlp": "relu2", "qk_norm": True, "logit_softcap": 15.0}])
def test_every_flag_keeps_the_kv_cache_equal_to_the_full_forward(flags):
    model = build(tiny_config(**flags), scale=0.5)
    idx = torch.randint(0, 101, (1, 20))
    full = model(idx)
    cache = KVCache(model.config, 1)
    steps = [model(idx[:, :12], cache)] + [model(idx[:, t:t + 1], cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)  # logits of size ~10
    assert not model.config.llama_compatible


def test_relu2_is_up_then_squared_relu_then_down_and_qk_norm_normalises_each_head():
    model = build(tiny_config(mlp="relu2", qk_norm=True), scale=0.5)
    block = model.blocks[0]
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(block.mlp(x), block.mlp.down_proj(torch.relu(block.mlp.up_proj(x)) ** 2))
    assert sum(p.numel() for p in block.mlp.parameters()) == 2 * 64 * 96
    q = block.attn.q_proj(x).view(2, 5, 4, 16)
    normed = block.attn.q_norm(q) / block.attn.q_norm.weight  # without its gain: unit RMS per head
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.ones(2, 5, 4), atol=1e-4, rtol=1e-4)


def test_zero_init_starts_every_block_as_the_identity():
    model = Transformer(tiny_config(zero_init=True))
    assert all(b.attn.o_proj.weight.abs().max() == 0 and b.mlp.down_proj.weight.abs().max() == 0 for b in model.blocks)
    x = torch.randn(1, 6, 64)
    cos, sin = rope_cos_sin(torch.arange(6), 16, 10000.0)
    torch.testing.assert_close(model.blocks[0](x, cos, sin, "causal"), x)
    assert tiny_config().llama_compatible and tiny_config(zero_init=True).llama_compatible


# ---------------------------------------------------------------- recorded attention weights (explore.py)


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa-swa", "gqa-swa"])
def test_recorded_attention_weights_reproduce_each_layers_output(name):
    """Attention.record_weights keeps the weights SDPA applied: weights @ V through o_proj gives back each
    layer's own (SDPA) output, hidden keys (the future, and beyond a sliding window) are exactly 0, and
    recording changes no logit."""
    config = tiny_config(**CACHE_CONFIGS[name])
    model = build(config, scale=0.1)
    idx = torch.randint(0, config.vocab_size, (2, 12))  # longer than both sliding windows
    seen = {}  # layer -> (the attention module's input, its output), from the plain SDPA run
    hooks = [block.attn.register_forward_hook(lambda m, args, out, layer=layer: seen.__setitem__(layer, (args[0], out)))
             for layer, block in enumerate(model.blocks)]
    with torch.no_grad():
        logits = model(idx)
        for hook in hooks:
            hook.remove()
        for block in model.blocks:
            block.attn.record_weights = True
        assert torch.equal(model(idx), logits)
    window = config.swa_window or 12
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    visible = (j <= i) & (j > i - window)  # (T, T)
    groups = config.n_heads // config.n_kv_heads
    for layer, block in enumerate(model.blocks):
        attn, (x, out) = block.attn, seen[layer]
        weights = attn.weights  # (B, n_heads, T, T)
        assert weights.shape == (2, config.n_heads, 12, 12)
        assert torch.all(weights[..., ~visible] == 0) and torch.all(weights[..., visible] > 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, config.n_heads, 12))
        v = attn.v_proj(x).view(2, 12, config.n_kv_heads, config.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        y = weights @ v.repeat_interleave(groups, dim=1)  # (B, n_heads, T, head_dim)
        with torch.no_grad():
            torch.testing.assert_close(attn.o_proj(y.transpose(1, 2).reshape(2, 12, -1)), out)
