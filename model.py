"""A modern decoder-only Transformer, small enough to read in one sitting.

The network is the Llama recipe: token embedding -> N pre-norm blocks
(RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual) -> RMSNorm -> LM head.
Attention uses rotary position embeddings (RoPE), grouped-query attention (GQA) and an
optional sliding window. A preallocated KV cache makes decoding one token cost one step.

This file holds only the model: no tokenizer, no files, no training loop. Other scripts import it.
`tests/test_model.py` proves it equal to Hugging Face's `LlamaForCausalLM` on random weights.

    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=250, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2))
    logits = model(torch.randint(0, 250, (1, 10)))          # (1, 10, 250): one logit per token of the vocabulary
"""

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from schema import NonNegativeInt, PositiveFloat, PositiveInt, Range, check_fields


@dataclass
class ModelConfig:
    """Architecture hyperparameters: the `model:` section of a YAML config. Each type declares the values it
    allows (schema.py); the checks below are the rules that tie two fields together."""

    vocab_size: PositiveInt = 50257  # the tokenizer's vocabulary (GPT-2's by default): logits per position (see padded_vocab_size)
    n_layers: PositiveInt = 4  # number of Transformer blocks
    d_model: PositiveInt = 256  # width of the residual stream
    n_heads: PositiveInt = 8  # query heads; head_dim = d_model / n_heads
    n_kv_heads: PositiveInt = 4  # key/value heads shared by groups of query heads (GQA); 1 = MQA, n_heads = MHA
    d_ff: PositiveInt = 704  # hidden width of the SwiGLU MLP (about 8/3 * d_model)
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0  # on attention weights and each residual branch, training only
    rope_theta: PositiveFloat = 10000.0  # RoPE base: larger = slower-rotating low frequencies, longer reach
    norm_eps: PositiveFloat = 1e-5  # epsilon inside RMSNorm
    max_seq_len: PositiveInt = 256  # longest sequence the KV cache holds and training may use
    tie_embeddings: bool = True  # share the input embedding with the output projection
    swa_window: NonNegativeInt = 0  # sliding-window attention: 0 = full causal; w > 0 = each token sees the last w
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    # Departures from the Llama recipe, off by default (measured for the Shakespeare recipe, docs/PERFORMANCE.md).
    # convert.py refuses to export a model that uses one: Hugging Face's Llama could not compute it.
    mlp: Literal["swiglu", "relu2"] = "swiglu"  # swiglu (Llama's gated MLP) | relu2: down(relu(up(x))^2), 2 matrices
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before RoPE: attention logits stay bounded
    logit_softcap: Annotated[float, Range(ge=0)] = 0.0  # 0 = off; c > 0: logits = c * tanh(logits / c), none above c
    zero_init: bool = False  # the two projections that write into the residual stream start at zero

    # The fields that change how the model trains, not what it computes: a resumed run and an SFT run may
    # change them (training.find_resume_checkpoint, finetune.read_base); every other field must match.
    ADJUSTABLE: ClassVar[tuple[str, ...]] = ("dropout", "gradient_checkpointing")

    def __post_init__(self):
        check_fields(self, "model.")  # each field's type and allowed values, as declared above
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.d_model / model.n_heads must be even for RoPE, got head_dim {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")

    @property
    def llama_compatible(self) -> bool:
        """Whether Hugging Face's Llama (or Mistral) computes exactly this network (zero_init only changes the start)."""
        return self.mlp == "swiglu" and not self.qk_norm and not self.logit_softcap

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output head: vocab_size rounded up to a multiple of 64 (nanochat's rule).

        Weights stay in aligned blocks and a checkpoint's rows keep the shape train.py always used. The extra
        rows are never an input nor a target, and the head multiplies by its first vocab_size rows only, so
        they never reach a logit (measured faster on a CPU than computing every row and slicing the logits).
        """
        return 64 * math.ceil(self.vocab_size / 64)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain.

    Cheaper than LayerNorm (no mean, no bias) and just as stable. Computed in fp32 because the
    mean of squares overflows or loses precision in half precision.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """Rotation angles for RoPE: position p, frequency pair i turns by p * theta^(-2i/head_dim).

    Computed in fp32 from scratch on every call (cheap), so half-precision weights never
    round the angles. Returns cos and sin of shape (T, head_dim / 2).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + head_dim/2]) pair of every head by its position's angle.

    This "split halves" pairing is the one Hugging Face Llama uses, so exported weights need no
    permutation. Because a rotation by angle(p) dotted with one by angle(s) depends only on p - s,
    attention scores see relative positions.  x: (B, T, H, head_dim), cos/sin: (T, head_dim/2)
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, T, H, head_dim/2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim/2): broadcast over heads
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated once.

    Decoding token t then attends to the t cached keys instead of recomputing them: one forward
    step per new token. `length` counts the positions filled; the model advances it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, config.max_seq_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0

    def update(self, layer: int, k, v):
        """Write k, v (B, n_kv_heads, T, head_dim) at the next positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class BlockDecodeWeights(NamedTuple):
    """One block's matrices as a decode step reads them fastest on a CPU (see Transformer.decode_weights).

    Transposed to (in, out) and the products that read the same input side by side: q|k|v, gate|up.
    """

    qkv: torch.Tensor  # (d_model, (n_heads + 2 * n_kv_heads) * head_dim)
    o: torch.Tensor  # (n_heads * head_dim, d_model)
    up: torch.Tensor  # (d_model, 2 * d_ff) gate|up for swiglu; (d_model, d_ff) for relu2
    down: torch.Tensor  # (d_ff, d_model)


class DecodeWeights(NamedTuple):
    """Every matrix of the model in decoding's layout: forward(decode=...) computes the same logits with them."""

    blocks: list[BlockDecodeWeights]
    head: torch.Tensor  # (d_model, vocab_size): the head's first vocab_size rows, transposed


# enable_gqa (torch >= 2.5) lets SDPA share each K/V head across its query group without copying.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def attention_weights(q, k, mask):
    """The weights SDPA applies, written out: softmax(q k^T / sqrt(head_dim)), hidden keys exactly 0.

    q: (B, n_heads, T_q, head_dim), k: (B, n_kv_heads, T_k, head_dim), mask: as attention_mask returns.
    Returns (B, n_heads, T_q, T_k) in fp32; each row sums to 1. For looking inside only (see Attention).
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads K/V head h // groups
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, n_heads, T_q, T_k)
    if isinstance(mask, str):  # "causal": queries and keys are the same positions 0..T-1
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE and grouped-query K/V heads.

    Looking inside (explore.py): set `record_weights = True` and each forward also keeps, in
    `self.weights`, the attention weights of that call, computed the explicit way by
    `attention_weights` (B, n_heads, T_q, T_k; before dropout). The output still comes from SDPA,
    so recording never changes what the model computes; it is off by default and costs nothing then.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        self.record_weights, self.weights = False, None
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, decode: BlockDecodeWeights | None = None):
        B, T, _ = x.shape
        if decode is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # the same three products as one
            kv_dim = self.n_kv_heads * self.head_dim
            q, k, v = (x @ decode.qkv).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_heads, T_past + T, head_dim)
        if self.record_weights:
            self.weights = attention_weights(q, k, mask)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1 and not _SDPA_HAS_GQA:  # older torch: copy each K/V head for its query group
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask if isinstance(mask, torch.Tensor) else None,
            is_causal=isinstance(mask, str),  # the only string attention_mask returns is "causal"
            dropout_p=self.dropout if self.training else 0.0,
            **extra,
        )  # (B, n_heads, T, head_dim): softmax(q k^T / sqrt(head_dim)) v
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y) if decode is None else y @ decode.o


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x)). The gate lets each hidden unit switch itself off."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, decode: BlockDecodeWeights | None = None):
        if decode is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = (x @ decode.up).chunk(2, dim=-1)  # both products as one
        return (F.silu(gate) * up) @ decode.down


class ReLUSquared(nn.Module):
    """Ungated MLP: down(relu(up(x))^2). Two matrices instead of SwiGLU's three, so a wider d_ff for the same size."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, decode: BlockDecodeWeights | None = None):
        if decode is None:
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return F.relu(x @ decode.up).square() @ decode.down


class Block(nn.Module):
    """One pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Normalising only the branch inputs keeps the residual stream an untouched sum, which is what
    lets deep stacks train without warm-up tricks.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else ReLUSquared(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, decode: BlockDecodeWeights | None = None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, decode))
        return x + self.drop(self.mlp(self.mlp_norm(x), decode))


def attention_mask(q_start: int, q_len: int, k_len: int, window: int, device):
    """Which keys each query may see, as SDPA expects: "causal", None (all) or a bool (q_len, k_len) mask.

    Query at absolute position i sees key j iff  i - window < j <= i  (window 0 = no lower bound).
    The same rule serves full-sequence training and cached decoding, so the two always agree.
    """
    if window == 0 or k_len <= window:
        if q_start == 0 and q_len == k_len:
            return "causal"  # the fast path: SDPA builds the triangle itself
        if q_len == 1 and q_start == k_len - 1:
            return None  # a single new token sees every cached key
    i = torch.arange(q_start, q_start + q_len, device=device)[:, None]  # (q_len, 1) query positions
    j = torch.arange(k_len, device=device)[None, :]  # (1, k_len) key positions
    visible = j <= i
    if window > 0:
        visible &= j > i - window
    return visible


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    The embedding and the head hold padded_vocab_size rows (see ModelConfig); the logits cover vocab_size.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one matrix reads tokens in and writes them out
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Initial values (GPT-2 / Llama practice):

        - every Linear and the embedding: normal(0, 0.02), no biases anywhere;
        - the two projections that write into the residual stream (attn.o_proj, mlp.down_proj):
          normal(0, 0.02 / sqrt(2 * n_layers)), so the stream's variance stays O(1) however deep;
        - RMSNorm gains: 1 (their constructor does it).
        With tied embeddings, the output head starts from the embedding's values. With zero_init, the two
        residual projections start at 0: every block starts as the identity and the gradient still flows.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name in ("o_proj", "down_proj"):
            if hasattr(module, name):
                std = 0.0 if self.config.zero_init else 0.02 / math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(getattr(module, name).weight, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6 per matmul weight + attention.

        The embedding lookup is not a matmul, the output head is (tied or not): its vocab_size rows in use.
        """
        c = self.config
        untied_head = 0 if c.tie_embeddings else self.lm_head.weight.numel()
        matmul_weights = self.num_parameters(exclude_embeddings=True) - untied_head + c.vocab_size * c.d_model
        attn_span = min(seq_len, c.swa_window) if c.swa_window else seq_len
        return 6 * matmul_weights + 12 * c.n_layers * c.d_model * attn_span

    def forward(self, idx, cache: KVCache | None = None, last_only: bool = False,
                decode: DecodeWeights | None = None):
        """idx: (B, T) token ids. With a cache, idx holds the next T tokens after those already cached.

        last_only=True returns only the last position's logits (B, 1, vocab_size): generation needs
        nothing else, and skipping the output head elsewhere makes a long prefill several times cheaper.
        decode: the weights in decoding's layout (see decode_weights); the same logits, faster on a CPU.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = rope_cos_sin(torch.arange(start, start + T, device=idx.device), self.config.head_dim,
                                self.config.rope_theta)
        mask = attention_mask(start, T, start + T, self.config.swa_window, idx.device)  # one mask, all layers
        x = self.drop(self.embed(idx))  # (B, T, d_model)
        for layer, block in enumerate(self.blocks):
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, layer, None if decode is None else decode.blocks[layer])
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if decode is None:
            # The first vocab_size rows: a contiguous view, so no padding row is ever computed or copied.
            logits = F.linear(x, self.lm_head.weight[:self.config.vocab_size])  # (B, T, vocab_size)
        else:
            logits = x @ decode.head  # (B, T, vocab_size)
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    def decode_weights(self) -> DecodeWeights:
        """Every matrix as a contiguous (in, out) copy, q|k|v and gate|up side by side, for forward(decode=...).

        A decode step multiplies ONE vector by each matrix, so it is bound by how fast the weights stream from
        memory. On a CPU, torch's BLAS streams this layout faster than nn.Linear's (out, in) one (the head twice
        as fast) and one wide product beats two or three narrow ones (benchmarks/bench_decode.py;
        docs/PERFORMANCE.md). It is a copy the caller keeps (infer.py, explore.py: once per loaded model), so
        the modules never change and threads may share them; it does not follow later changes to the weights.
        """
        def t(*linears):  # (in, sum of outs)
            return torch.cat([linear.weight for linear in linears]).t().contiguous()

        blocks = []
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            up = t(mlp.gate_proj, mlp.up_proj) if isinstance(mlp, SwiGLU) else t(mlp.up_proj)
            blocks.append(BlockDecodeWeights(t(attn.q_proj, attn.k_proj, attn.v_proj), t(attn.o_proj), up,
                                             t(mlp.down_proj)))
        head = self.lm_head.weight[:self.config.vocab_size].t().contiguous()
        return DecodeWeights(blocks, head)
