"""Saved-activation bytes of THIS project's layers (framework/components/model.py), per policy.

Derived tensor by tensor from what each op saves for backward (framework/components/ops.py
documents the custom ones); tests measure the real model with saved_tensors_hooks and compare.

Per decoder layer, for T local tokens (micro_batch x seq_len / sp), dtype size `a`, with
H = hidden, F = ffn / tp, hq = heads / tp, hkv = kv heads / tp, d = head_dim:

anchors (never recomputed token-wise; `anchor_offload_fraction` of their tokens on the host)
    x      layer input, saved by the attention norm            T * H * a
    q      saved by SDPA (after RoPE)                          T * hq * d * a
    k, v   saved by SDPA (kv heads, replicated if < sp)        2 * T * sp * max(hkv/sp, 1) * d * a
    o      SDPA output (the output projection saves a view)    T * hq * d * a
    lse    SDPA log-sum-exp, fp32                              T * hq * 4
    o_sp   sp > 1 only: the output after the reverse all-to-all, saved by wo   T * hq * d * a
token-local (split: offload_fraction to host, recompute_fraction recomputed, rest kept)
    none:       rstd1, h1 = norm1(x), x2, rstd2, h2 = norm2(x2), a = w1 h2, b = w3 h2,
                p = silu(a) * b      T * (3H * a + 3F * a + 8)
    selective:  h1, h2 and p are recomputed from x, x2, (a, b):  T * (H * a + 2F * a + 8)
full recompute keeps only x (anchor_offload_fraction of it on the host).

Outside the layers, per micro-batch: token ids saved by the embedding (int64), the final
norm's input and rstd, the loss's hidden input, targets (int64) and log-sum-exp, and the
RoPE cos/sin tables shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import ModelConfig
from planner.plan import LayerPlan

FP32_BYTES = 4
INDEX_BYTES = 8  # int64 token ids and targets


def token_split(tokens: int, offload_fraction: float, recompute_fraction: float) -> tuple[int, int]:
    """(offloaded, recomputed) token counts of a sequence of `tokens` local tokens.

    The runtime and the cost model both use this rounding, so predictions are exact.
    """
    offloaded = round(offload_fraction * tokens)
    recomputed = round((offload_fraction + recompute_fraction) * tokens) - offloaded
    return offloaded, max(0, min(recomputed, tokens - offloaded))


@dataclass(frozen=True)
class LayerShape:
    """Per-rank widths of one decoder layer under tp and sp."""

    hidden: int
    ffn: int
    q_heads: int
    kv_heads_in_core: int
    head_dim: int
    sp: int
    dtype_bytes: int

    @staticmethod
    def of(model: ModelConfig, dtype_bytes: int, tp: int = 1, sp: int = 1) -> LayerShape:
        """Shapes of `model` on one rank of a tp x sp group."""
        q_heads = model.num_heads // tp
        kv_heads = model.num_kv_heads // tp
        return LayerShape(
            hidden=model.hidden_size,
            ffn=model.ffn_size // tp,
            q_heads=q_heads,
            kv_heads_in_core=max(kv_heads // sp, 1),
            head_dim=model.resolved_head_dim,
            sp=sp,
            dtype_bytes=dtype_bytes,
        )

    def input_bytes(self, tokens: int) -> int:
        """The layer input x: [T, H]."""
        return tokens * self.hidden * self.dtype_bytes

    def attention_core_bytes(self, tokens: int) -> int:
        """q, k, v, o, lse saved by SDPA (+ the post-all-to-all output under sp)."""
        a = self.dtype_bytes
        # Under Ulysses the core sees sp x the tokens with 1/sp of the heads.
        q = tokens * self.q_heads * self.head_dim * a
        kv = 2 * tokens * self.sp * self.kv_heads_in_core * self.head_dim * a
        out = q * (2 if self.sp > 1 else 1)
        lse = tokens * self.q_heads * FP32_BYTES
        return q + kv + out + lse

    def anchor_bytes(self, tokens: int) -> int:
        """Everything token-wise recomputation regenerates the rest from."""
        return self.input_bytes(tokens) + self.attention_core_bytes(tokens)

    def local_bytes(self, tokens: int, selective: bool) -> int:
        """Token-local saved tensors (see the module docstring)."""
        a = self.dtype_bytes
        if selective:
            return tokens * (self.hidden * a + 2 * self.ffn * a + 2 * FP32_BYTES)
        return tokens * (3 * self.hidden * a + 3 * self.ffn * a + 2 * FP32_BYTES)


@dataclass(frozen=True)
class LayerActivationBytes:
    """Where one layer's saved activations of one micro-batch live (bytes, one rank)."""

    device_bytes: int
    host_bytes: int
    recomputed_bytes: int


def layer_activation_bytes(
    shape: LayerShape, micro_batch: int, seq_local: int, policy: LayerPlan
) -> LayerActivationBytes:
    """Device-resident, host-offloaded and recomputed bytes of one layer for one micro-batch.

    Token splits are per sequence (every sequence of the micro-batch is split the same way),
    rounded by token_split exactly as the runtime does.
    """
    anchor_off, _ = token_split(seq_local, policy.anchor_offload_fraction, 0.0)
    anchor_size = shape.input_bytes if policy.recompute == "full" else shape.anchor_bytes
    anchor_host = micro_batch * anchor_size(anchor_off)
    if policy.recompute == "full":
        kept_input = micro_batch * shape.input_bytes(seq_local - anchor_off)
        regenerated = micro_batch * (
            shape.attention_core_bytes(seq_local) + shape.local_bytes(seq_local, selective=False)
        )
        return LayerActivationBytes(kept_input, anchor_host, regenerated)
    selective = policy.recompute == "selective"
    anchor_device = micro_batch * shape.anchor_bytes(seq_local - anchor_off)
    off, rec = token_split(seq_local, policy.offload_fraction, policy.recompute_fraction)
    keep = seq_local - off - rec
    local = shape.local_bytes
    device = anchor_device + micro_batch * local(keep, selective)
    host = anchor_host + micro_batch * local(off, selective)
    recomputed = micro_batch * local(rec, selective)
    if selective:  # h1, h2 and p of every token (local(rec, selective) leaves them out)
        dropped_per_token = (2 * shape.hidden + shape.ffn) * shape.dtype_bytes
        recomputed += micro_batch * seq_local * dropped_per_token
    return LayerActivationBytes(device, host, recomputed)


def outside_layers_bytes(
    model: ModelConfig,
    micro_batch: int,
    seq_local: int,
    dtype_bytes: int,
    first_stage: bool = True,
    last_stage: bool = True,
) -> int:
    """Saved bytes outside the decoder layers for one micro-batch on one rank.

    First stage: token ids (embedding backward). Last stage: final norm input + rstd, the
    loss's hidden input, targets and log-sum-exp. Every stage: the RoPE cos/sin tables.
    """
    tokens = micro_batch * seq_local
    total = 2 * seq_local * model.resolved_head_dim * dtype_bytes  # cos, sin
    if first_stage:
        total += tokens * INDEX_BYTES
    if last_stage:
        total += tokens * (2 * model.hidden_size * dtype_bytes + 2 * FP32_BYTES + INDEX_BYTES)
    return total
