"""A Llama-family decoder: RMSNorm, RoPE, grouped-query attention (SDPA), SwiGLU.

The decoder layer is written as three explicit regions, because the activation runtime
(offload/) treats them differently:

    pre_attention(x)      token-local: norm -> q/k/v projections -> RoPE
    attention_core(q,k,v) mixes tokens: causal SDPA (Ulysses all-to-all around it under sp)
    post_attention(x, o)  token-local: output projection + residual -> norm -> SwiGLU + residual

Everything outside the attention core is token-local, so any token slice of its activations
can be regenerated from the layer input x and the attention output o alone (MEMO's
token-wise recomputation). `activation_policy` (set by offload/) takes over the layer's
forward to keep, offload or recompute what the plan says; `cheap_op_runner` lets it recompute
the cheap memory-heavy ops (norms, SwiGLU product) for selective recomputation.

Build on the meta device, parallelise, then `to_empty()` + `init_weights()`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from configs.schema import ModelConfig
from framework.components.ops import apply_rope, rms_norm, swiglu
from framework.components.rope import rope_inverse_frequencies, rope_tables

Rope = tuple[Tensor, Tensor]
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA on [batch, seq, heads, head_dim] inputs; returns [batch, seq, heads, head_dim].

    Passing transposed views keeps the output in [b, s, h, d] memory order on both the CUDA
    and CPU flash kernels, so the output projection's saved input is a view of the tensor
    SDPA saves (one copy, not two).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention projections; `core_fn` is replaced under sequence parallelism."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        q_width = cfg.num_heads * self.head_dim
        kv_width = cfg.num_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.hidden_size, q_width, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_width, cfg.hidden_size, bias=cfg.out_bias)
        self.core_fn: AttentionFn = causal_attention

    def project_qkv(self, h: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as [batch, seq, heads, head_dim] with RoPE applied to q and k."""
        batch, seq, _ = h.shape
        # -1 heads: under tensor parallelism each rank holds num_heads / tp of them
        q = self.wq(h).view(batch, seq, -1, self.head_dim)
        k = self.wk(h).view(batch, seq, -1, self.head_dim)
        v = self.wv(h).view(batch, seq, -1, self.head_dim)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 h) * w3 h)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.w2 = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, split into the three regions described in the module doc."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        # Plain attributes, not submodules: they never change the state_dict.
        self.activation_policy: Callable[[DecoderLayer, Tensor, Rope], Tensor] | None = None
        self.cheap_op_runner: Callable[..., Tensor] | None = None

    def _cheap(self, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
        """Run a cheap, memory-heavy op (norm, SwiGLU product) through the policy, if any."""
        if self.cheap_op_runner is None:
            return fn(*args)
        return self.cheap_op_runner(fn, *args)

    def pre_attention(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """Token-local: norm, q/k/v projections, RoPE."""
        h = self._cheap(self.attention_norm, x)
        return self.attention.project_qkv(h, rope)

    def attention_core(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention over the whole sequence; returns [batch, seq, heads * head_dim]."""
        return self.attention.core_fn(q, k, v).flatten(2)

    def post_attention(self, x: Tensor, o: Tensor) -> Tensor:
        """Token-local: output projection + residual, norm, SwiGLU MLP + residual."""
        x2 = x + self.attention.wo(o)
        h2 = self._cheap(self.ffn_norm, x2)
        ffn = self.feed_forward
        p = self._cheap(swiglu, ffn.w1(h2), ffn.w3(h2))
        return x2 + ffn.w2(p)

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        if self.activation_policy is not None:
            return self.activation_policy(self, x, rope)
        q, k, v = self.pre_attention(x, rope)
        return self.post_attention(x, self.attention_core(q, k, v))


class Transformer(nn.Module):
    """Embedding -> decoder layers -> final norm. `forward` returns hidden states; the loss
    (chunked cross-entropy against the output projection) is computed by
    `framework.components.loss`.

    Pipeline stages delete the modules they do not own (tok_embeddings/norm/output set to
    None, layers removed from the ModuleDict); forward then passes hidden states through.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Keyed by the global layer index so names stay stable when stages drop layers.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output: nn.Linear | None = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        # Under sequence parallelism each rank holds one contiguous chunk of every sequence.
        self.sequence_parallel_rank = 0

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [batch, seq] (or hidden states on a non-first pipeline stage) -> hidden."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        seq = h.shape[1]
        rope = rope_tables(self.rope_inv_freq, self.sequence_parallel_rank * seq, seq, h.dtype)
        for layer in self.layers.values():
            h = layer(h, rope)
        return self.norm(h) if self.norm is not None else h

    def output_weight(self) -> Tensor:
        """The [vocab, hidden] projection used by the loss (the embedding when tied)."""
        if self.output is not None:
            return self.output.weight
        assert self.tok_embeddings is not None, "tied output needs the embedding on this stage"
        return self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation that does not depend on device, layout or sharding.

        Each parameter draws from its own generator seeded by (seed, name), so a model split
        over any number of ranks starts from exactly the weights of a single-process model.
        """
        self.rope_inv_freq.copy_(rope_inverse_frequencies(self.cfg))
        for name, param in self.named_parameters():
            full = initial_value(name, tuple(param.shape), self.cfg, seed)
            copy_into_local(param, full)


def copy_into_local(param: Tensor, full: Tensor) -> None:
    """Copy a full CPU tensor into a (possibly DTensor-sharded) parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        shard = distribute_tensor(
            full.to(param.device_mesh.device_type), param.device_mesh, param.placements
        )
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> Tensor:
    """The initial fp32 value of parameter `name` (CPU), independent of how it is sharded."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    std = cfg.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / math.sqrt(2 * cfg.num_layers)  # residual-branch outputs, GPT-2 style
    return torch.randn(shape, generator=generator) * std


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Transformer:
    """Construct the model on `device` (meta by default: no memory is allocated)."""
    with torch.device(device):
        return Transformer(cfg)


def materialize(model: Transformer, device: str | torch.device, seed: int) -> Transformer:
    """Allocate a meta-built model on `device` and initialise it deterministically."""
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (module.parameters() yields a shared one once); works on meta."""
    return sum(param.numel() for param in model.parameters())
