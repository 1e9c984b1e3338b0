"""Step time of memplan's activation policies against torch's own tools, side by side.

Each row pairs a memplan policy (every decoder layer under the offload engine) with the
torch tool that does the same job on the same model, parameters and input:

    row               memplan (offload engine)               torch
    none              keep-all plan, training path: plain    plain layers (the A/A noise floor)
    keep-all engine   keep-all through the engine's hooks    plain layers
    full              recompute=full                         checkpoint(use_reentrant=False)
    selective         recompute=selective                    selective checkpoint, MATMUL_OPS saved
    token-wise f      recompute_fraction=f of the tokens     checkpoint on f of the layers
    offload f         offload_fraction=f, anchors f          copying save_on_cpu on f of the layers
    optimizer step    fused AdamW (build_optimizer)          foreach AdamW, same parameter groups

A step is forward + backward of the decoder-layer stack (embedding and loss left out, so the
ratios are per layer): h = x, h = layer(h, rope) for every layer, h.backward(g). All
variants of one length run in one process on one model, in rotated order each round; a
row's ratio is the median over rounds of memplan's time / torch's time in the same round.

Bytes kept for backward are counted in a separate, untimed step per variant, each storage
once: the engine's own measurement (LayerActivationStats); for plain layers every tensor the
saved-tensor hooks see; for torch's checkpoint its retained inputs (plus, for the selective
one, the op outputs its policy caches); for save_on_cpu the host copies it makes. Parameters
and the RoPE tables (shared by every layer) are not counted.

On a CPU-only machine torch's save_on_cpu does not copy (tensor.cpu() of a CPU tensor is the
tensor itself); SAVE_ON_CPU_HOOKS is its pack/unpack pair with the copies made real, as they
are on a GPU.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from configs.schema import ModelConfig, TrainConfig
from framework.components.model import DecoderLayer, Rope, Transformer, build_model, materialize
from framework.components.optim import build_optimizer
from framework.components.rope import rope_tables
from offload import ActivationRuntime, HostBufferPool, apply_activation_plan, apply_layer_policies
from planner.plan import LayerPlan

NONE, KEEP_ENGINE, FULL, SELECTIVE = "none", "keep-all engine", "full", "selective"
TOKEN_WISE = {f"token-wise {round(f * 100)}%": f for f in (0.25, 0.5, 0.75)}
OFFLOAD = {f"offload {round(f * 100)}%": f for f in (0.5, 1.0)}
OPTIMIZER = "optimizer step"
ROWS = (NONE, KEEP_ENGINE, FULL, SELECTIVE, *TOKEN_WISE, *OFFLOAD)
"""The layer-stack rows, in table order (OPTIMIZER is timed apart, once per run)."""

_aten = torch.ops.aten
MATMUL_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    *(
        getattr(_aten, name).default
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
        )
        if hasattr(_aten, name)
    ),
}
"""Ops whose outputs torch's selective checkpoint saves: the matmuls and the attention kernel
(torchtitan's op-level SAC list without collectives). Leaving attention out would make torch
recompute it (slower than memplan) while keeping fewer bytes (no lse)."""


@dataclass
class SavedBytes:
    """Bytes kept for backward by one step of one variant, each storage once."""

    excluded: set[int]
    """Storages not counted: parameters and RoPE tables."""
    device: dict[int, int] = field(default_factory=dict)
    host: dict[int, int] = field(default_factory=dict)
    engine_device: int = 0
    engine_host: int = 0

    def add(self, tensor: Tensor, host: bool = False) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.excluded or storage.nbytes() == 0:
            return
        (self.host if host else self.device)[storage.data_ptr()] = storage.nbytes()

    def pack(self, tensor: Tensor) -> Tensor:
        """A saved-tensor pack hook that only counts (plain layers)."""
        if not isinstance(tensor, torch.nn.Parameter):
            self.add(tensor)
        return tensor

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values()) + self.engine_device

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values()) + self.engine_host


# ---- torch's tools, as per-layer activation policies (DecoderLayer.activation_policy) ----


def plain_layer(layer: DecoderLayer, x: Tensor, rope: Rope) -> Tensor:
    """DecoderLayer.forward without a policy."""
    q, k, v = layer.pre_attention(x, rope)
    return layer.post_attention(x, layer.attention_core(q, k, v))


def checkpointed_layer(layer: DecoderLayer, x: Tensor, rope: Rope, meter: SavedBytes | None):
    if meter is not None:
        meter.add(x)  # what non-reentrant checkpoint keeps: its inputs
    return checkpoint(plain_layer, layer, x, rope, use_reentrant=False)


def matmul_saving_policy(meter: SavedBytes | None, ctx: Any, op: Any, *args, **kwargs):
    """Selective checkpoint policy: save MATMUL_OPS outputs, recompute everything else."""
    if op not in MATMUL_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if meter is not None and not ctx.is_recompute:
        outputs = ctx.op_output if isinstance(ctx.op_output, tuple) else (ctx.op_output,)
        for out in outputs:
            if isinstance(out, Tensor):
                meter.add(out)
    return CheckpointPolicy.MUST_SAVE


def selective_checkpointed_layer(
    layer: DecoderLayer, x: Tensor, rope: Rope, meter: SavedBytes | None
) -> Tensor:
    if meter is not None:
        meter.add(x)
    contexts = partial(create_selective_checkpoint_contexts, partial(matmul_saving_policy, meter))
    return checkpoint(plain_layer, layer, x, rope, use_reentrant=False, context_fn=contexts)


def save_on_cpu_hooks(meter: SavedBytes | None) -> tuple[Callable, Callable]:
    """torch.autograd.graph.save_on_cpu's pack/unpack pair, copying on a CPU too: pack copies
    every saved tensor (parameters included, as torch does) to a host tensor, unpack copies it
    back (tensor.to(device) on a GPU; a clone here)."""
    pin = torch.cuda.is_available()

    def pack(tensor: Tensor) -> tuple[torch.device, Tensor]:
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        host.copy_(tensor)
        if meter is not None:
            meter.add(host, host=True)
        return tensor.device, host

    def unpack(packed: tuple[torch.device, Tensor]) -> Tensor:
        device, host = packed
        return host.to(device, non_blocking=pin, copy=True)

    return pack, unpack


def saved_on_cpu_layer(layer: DecoderLayer, x: Tensor, rope: Rope, meter: SavedBytes | None):
    with torch.autograd.graph.saved_tensors_hooks(*save_on_cpu_hooks(meter)):
        return plain_layer(layer, x, rope)


# ---- variants ----------------------------------------------------------------------------

Finish = Callable[[], None]


@dataclass
class Variant:
    """One way of running the layer stack; install() puts it on the layers for one step and
    returns the function that takes it off again (adding the engine's bytes to `meter`)."""

    key: str
    install: Callable[[list[DecoderLayer], SavedBytes | None], Finish]


def memplan_variant(key: str, policies: list[LayerPlan], training_path: bool) -> Variant:
    """The engine with `policies`; the pool persists across steps, as in training.
    training_path: apply_layer_policies (keep-all layers stay plain), else every layer."""
    pool = HostBufferPool()

    def install(layers: list[DecoderLayer], meter: SavedBytes | None) -> Finish:
        runtime = ActivationRuntime(pool)
        if training_path:
            apply_layer_policies(layers, policies, runtime)
        else:
            runtime = apply_activation_plan(layers, policies, pool)

        def finish() -> None:
            if meter is not None:
                for stats in runtime.layer_stats().values():
                    meter.engine_device += stats.device_bytes
                    meter.engine_host += stats.host_bytes
            runtime.remove()

        return finish

    return Variant(key, install)


def torch_variant(key: str, tool: Callable | None, on_layers: set[int] | None = None) -> Variant:
    """A torch tool (a *_layer function above taking a meter) on the layers whose index is in
    on_layers (None: all); the other layers run plain."""

    def install(layers: list[DecoderLayer], meter: SavedBytes | None) -> Finish:
        for layer in layers:
            if tool is not None and (on_layers is None or layer.layer_index in on_layers):
                layer.activation_policy = partial(_call_tool, tool, meter)

        def finish() -> None:
            for layer in layers:
                layer.activation_policy = None

        return finish

    return Variant(key, install)


def _call_tool(tool: Callable, meter: SavedBytes | None, layer, x, rope) -> Tensor:
    return tool(layer, x, rope, meter)


def spread_layers(num_layers: int, fraction: float) -> set[int]:
    """round(fraction x num_layers) layer indices, evenly spread: {0, 4} for 8 x 0.25."""
    count = round(fraction * num_layers)
    return {j * num_layers // count for j in range(count)} if count else set()


def row_variants(row: str, num_layers: int) -> tuple[Variant, Variant]:
    """(memplan, torch) for a layer-stack row."""

    def plans(offload: float, recompute: str, rho: float, beta: float) -> list[LayerPlan]:
        return [LayerPlan(i, 0, offload, recompute, rho, beta) for i in range(num_layers)]

    plain = torch_variant("torch:plain", None)
    if row == NONE:
        return memplan_variant(f"memplan:{row}", plans(0, "none", 0, 0), True), plain
    if row == KEEP_ENGINE:
        return memplan_variant(f"memplan:{row}", plans(0, "none", 0, 0), False), plain
    if row == FULL:
        torch_full = torch_variant("torch:checkpoint", checkpointed_layer)
        return memplan_variant(f"memplan:{row}", plans(0, "full", 0, 0), True), torch_full
    if row == SELECTIVE:
        torch_sac = torch_variant("torch:selective checkpoint", selective_checkpointed_layer)
        return memplan_variant(f"memplan:{row}", plans(0, "selective", 0, 0), True), torch_sac
    if row in TOKEN_WISE:
        fraction = TOKEN_WISE[row]
        layers = spread_layers(num_layers, fraction)
        return (
            memplan_variant(f"memplan:{row}", plans(0, "none", fraction, 0), True),
            torch_variant(f"torch:checkpoint {sorted(layers)}", checkpointed_layer, layers),
        )
    if row in OFFLOAD:
        fraction = OFFLOAD[row]
        layers = spread_layers(num_layers, fraction)
        return (
            memplan_variant(f"memplan:{row}", plans(fraction, "none", 0, fraction), True),
            torch_variant(f"torch:save_on_cpu {sorted(layers)}", saved_on_cpu_layer, layers),
        )
    raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")


# ---- the stack and its step ---------------------------------------------------------------


@dataclass
class Stack:
    """The model's decoder layers with one input of `seq` tokens and a fixed output grad."""

    model: Transformer
    x: Tensor
    grad: Tensor
    rope: Rope

    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.model.layers.values())

    def excluded_storages(self) -> set[int]:
        tensors = [*self.model.parameters(), *self.rope]
        return {t.untyped_storage().data_ptr() for t in tensors}

    def step(self, meter: SavedBytes | None = None) -> None:
        """Forward + backward of the layer stack (parameter grads are reset first)."""
        for param in self.model.parameters():
            param.grad = None
        self.x.grad = None
        h = self.x
        for layer in self.layers:
            counting = nullcontext()
            if meter is not None:  # inner hooks (engine, checkpoint) take precedence
                counting = torch.autograd.graph.saved_tensors_hooks(meter.pack, _same)
            with counting:
                h = layer(h, self.rope)
        h.backward(self.grad)


def _same(tensor: Tensor) -> Tensor:
    return tensor


def build_stack(model_cfg: ModelConfig, seq: int, batch: int, seed: int = 0) -> Stack:
    """The project's model (fp32, CPU), an input leaf [batch, seq, hidden] and output grad."""
    model = materialize(build_model(model_cfg), "cpu", seed)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, seq, model_cfg.hidden_size)
    x = torch.randn(shape, generator=generator).requires_grad_()
    grad = torch.randn(shape, generator=generator) / (batch * seq) ** 0.5
    rope = rope_tables(model.rope_inv_freq, 0, seq, x.dtype)
    return Stack(model, x, grad, rope)


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
"""cpu: CPU seconds of the stepping thread. With one torch thread every kernel runs on it,
so this is the step's own work, without the time other processes on a shared machine take
from it (cache and memory-bandwidth interference remain). wall: elapsed seconds."""


def run_variant(
    stack: Stack, variant: Variant, meter: SavedBytes | None = None, clock: str = "wall"
) -> float:
    """Seconds of one step of `variant` on `clock` (installing and removing it is not
    timed; a garbage collection runs before it)."""
    now = CLOCKS[clock]
    gc.collect()
    finish = variant.install(stack.layers, meter)
    try:
        start = now()
        stack.step(meter)
        return now() - start
    finally:
        finish()


# ---- results ------------------------------------------------------------------------------


@dataclass
class RowResult:
    row: str
    memplan_key: str
    torch_key: str
    memplan_seconds: float
    """Median step time."""
    torch_seconds: float
    ratio: float
    """Median over rounds of memplan / torch in the same round."""
    memplan_bytes: tuple[int, int]
    """(device, host) bytes kept for backward."""
    torch_bytes: tuple[int, int]
    extra_over_none: float | None = None
    """(memplan time - plain time) / plain time, paired per round (median)."""


@dataclass
class LengthResult:
    seq: int
    batch: int
    rounds: int
    clock: str
    rows: list[RowResult]
    seconds: dict[str, list[float]]
    """Every timed step, by variant key."""

    def row(self, name: str) -> RowResult | None:
        return next((r for r in self.rows if r.row == name), None)


def measure_length(
    model_cfg: ModelConfig,
    seq: int,
    batch: int,
    rows: Sequence[str],
    rounds: int,
    warmup: int = 1,
    clock: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> LengthResult:
    """All `rows` at one length: bytes once per variant, then `rounds` rotated rounds, each
    step timed on `clock` (CLOCKS)."""
    stack = build_stack(model_cfg, seq, batch)
    pairs = {row: row_variants(row, model_cfg.num_layers) for row in rows}
    variants: dict[str, Variant] = {}
    for memplan, torch_side in pairs.values():
        variants.setdefault(memplan.key, memplan)
        variants.setdefault(torch_side.key, torch_side)
    variants.setdefault("torch:plain", torch_variant("torch:plain", None))
    saved: dict[str, SavedBytes] = {}
    for key, variant in variants.items():
        saved[key] = SavedBytes(stack.excluded_storages())
        run_variant(stack, variant, saved[key])
    order = list(variants)
    for _ in range(warmup):
        for key in order:
            run_variant(stack, variants[key])
    seconds: dict[str, list[float]] = {key: [] for key in order}
    for round_index in range(rounds):
        for key in rotated(order, round_index):
            seconds[key].append(run_variant(stack, variants[key], clock=clock))
        if log is not None:
            log(f"seq {seq}: round {round_index + 1}/{rounds}")
    plain = seconds["torch:plain"]
    results = []
    for row, (memplan, torch_side) in pairs.items():
        mine, theirs = seconds[memplan.key], seconds[torch_side.key]
        results.append(
            RowResult(
                row=row,
                memplan_key=memplan.key,
                torch_key=torch_side.key,
                memplan_seconds=statistics.median(mine),
                torch_seconds=statistics.median(theirs),
                ratio=statistics.median(a / b for a, b in zip(mine, theirs, strict=True)),
                memplan_bytes=_bytes(saved[memplan.key]),
                torch_bytes=_bytes(saved[torch_side.key]),
                extra_over_none=statistics.median(
                    a / b - 1.0 for a, b in zip(mine, plain, strict=True)
                ),
            )
        )
    return LengthResult(seq, batch, rounds, clock, results, seconds)


def rotated(order: list[str], round_index: int) -> list[str]:
    """Round r's order: `order` rotated by r, reversed on odd rounds, so that every variant
    runs at every place and after different neighbours (the state a step leaves behind,
    such as the allocator's heap, must not favour the one after it)."""
    shift = round_index % len(order)
    turned = order[shift:] + order[:shift]
    return turned[::-1] if round_index % 2 else turned


def _bytes(meter: SavedBytes) -> tuple[int, int]:
    return meter.device_bytes, meter.host_bytes


@dataclass
class OptimizerResult:
    parameters: int
    fused_seconds: float
    foreach_seconds: float
    ratio: float
    """Median over rounds of fused / foreach."""


def measure_optimizer(
    model_cfg: ModelConfig, train_cfg: TrainConfig, rounds: int, warmup: int = 2, clock: str = "cpu"
) -> OptimizerResult:
    """build_optimizer's fused AdamW against foreach AdamW with the same groups and
    hyper-parameters, on the model's parameters with fixed random gradients, alternating."""
    model = materialize(build_model(model_cfg), "cpu", 0)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    fused = build_optimizer([model], train_cfg, torch.device("cpu"))
    groups = [
        {"params": group["params"], "weight_decay": group["weight_decay"]}
        for group in fused.param_groups
    ]
    defaults = {k: fused.defaults[k] for k in ("lr", "betas", "eps")}
    foreach = torch.optim.AdamW(groups, **defaults, foreach=True)
    optimizers = {"fused": fused, "foreach": foreach}
    for _ in range(warmup):
        for optimizer in optimizers.values():
            optimizer.step()
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    now = CLOCKS[clock]
    for round_index in range(rounds):
        names = list(optimizers)[round_index % 2 :] + list(optimizers)[: round_index % 2]
        for name in names:
            gc.collect()
            start = now()
            optimizers[name].step()
            seconds[name].append(now() - start)
    pairs = zip(seconds["fused"], seconds["foreach"], strict=True)
    return OptimizerResult(
        parameters=sum(p.numel() for p in model.parameters()),
        fused_seconds=statistics.median(seconds["fused"]),
        foreach_seconds=statistics.median(seconds["foreach"]),
        ratio=statistics.median(a / b for a, b in pairs),
    )


# ---- targets (issue 20) -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float

    @property
    def met(self) -> bool:
        return self.value <= self.limit


def targets(result: LengthResult) -> list[Target]:
    """The issue's targets that this length's rows can check."""
    found = []
    full = result.row(FULL)
    if full is not None:
        found.append(Target("full / torch checkpoint", full.ratio, 1.01))
    selective = result.row(SELECTIVE)
    if selective is not None:
        found.append(Target("selective / torch selective checkpoint", selective.ratio, 1.0))
        memplan_kept, torch_kept = sum(selective.memplan_bytes), sum(selective.torch_bytes)
        found.append(Target("selective bytes kept / torch's", memplan_kept / torch_kept, 1.0))
    everything = result.row("offload 100%")
    if everything is not None:
        found.append(Target("offload 100% / copying save_on_cpu", everything.ratio, 1.0))
    quarter = result.row("token-wise 25%")
    if full is not None and quarter is not None and full.extra_over_none:
        share = quarter.extra_over_none / full.extra_over_none
        found.append(Target("token-wise 25% extra / full's extra", share, 0.3))
    return found


# ---- profiling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpTime:
    name: str
    self_ms: float
    """Self CPU time per step."""
    calls: float
    """Calls per step."""


def profile_variant(stack: Stack, variant: Variant, steps: int = 3, top: int = 12) -> list[OpTime]:
    """torch.profiler's top ops by self CPU time for `variant`, per step (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    run_variant(stack, variant)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_variant(stack, variant)
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        OpTime(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in averages[:top]
    ]
