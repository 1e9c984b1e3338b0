"""A whole model trained on one device under one activation policy at a time: what the
policy benchmarks (bench/longest_sequence.py, bench/throughput.py, bench/estimator_accuracy.py)
step and measure.

Policies (POLICIES):
    none         every saved activation stays on the device
    full         torch.utils.checkpoint (non-reentrant) around every decoder layer: the usual
                 full activation checkpointing baseline (torchtitan's "full" AC)
    save_on_cpu  torch.autograd.graph.save_on_cpu: every saved tensor goes to host memory
                 (pinned on CUDA) and comes back when backward needs it
    plan         memplan: a plan for a cluster that describes this device, applied with
                 offload.apply_layer_policies (host slabs reserved from the plan up front)

The model is built as `memplan profile` builds it (framework/measure/setup.py) and each step
is the runtime's train step (framework/measure/stage_step.py: framework/runtime/step.py's
loop, the runtime's AdamW): bf16 weights with fp32 master weights and Adam moments on CUDA
(16 bytes per parameter, the plan's accounting), fp32 on the CPU.

Peak memory: on CUDA torch.cuda.max_memory_allocated after a reset; on the CPU LiveBytes
(framework/measure/live_bytes.py) over the steps, added to the parameters and optimizer
states alive before; host storages (save_on_cpu's copies, host slabs) are counted apart.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from configs.schema import Config
from framework.measure.live_bytes import HostSaved, HostTaggedPool, LiveBytes
from framework.measure.optimizer import optimizer_state_tensors
from framework.measure.setup import build_stage_model, whole_model_setup
from framework.measure.stage_step import StageStep, timed
from framework.runtime.base import StepOutput
from offload import (
    ActivationRuntime,
    HostBufferPool,
    apply_layer_policies,
    reserve_plan_host_memory,
)
from planner.costs import training_dtype
from planner.plan import Plan

POLICIES = ("none", "full", "save_on_cpu", "plan")
POLICY_NOTES = {
    "none": "no recomputation: every saved activation stays on the device",
    "full": "torch.utils.checkpoint (non-reentrant) around every decoder layer",
    "save_on_cpu": "torch.autograd.graph.save_on_cpu: every saved tensor on the host",
    "plan": "memplan: make_plan for this device, offload.apply_layer_policies",
}


def plain_layer_forward(layer: Any, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    q, k, v = layer.pre_attention(x, rope)
    return layer.post_attention(x, layer.attention_core(q, k, v))


def checkpointed_layer(layer: Any, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """activation_policy of the `full` baseline: torch's checkpoint of the whole layer."""
    return checkpoint(plain_layer_forward, layer, x, rope, use_reentrant=False)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or pinned host) allocation failure."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    """Free what a finished or failed step left behind (cached CUDA blocks included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:  # cached pinned blocks of save_on_cpu
            host_empty()


@dataclass
class Measurement:
    """Some training steps at one length under one policy."""

    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """The loss of each step (read after the steps: no host sync inside them)."""
    device_peak_bytes: int | None = None
    """CUDA: max_memory_allocated over the steps; CPU: states + LiveBytes device peak."""
    host_bytes: int = 0
    """Host memory holding activations: the plan's slabs, or save_on_cpu's bytes per step."""
    failure: str | None = None
    """Why the steps did not finish (e.g. 'OOM: ...'); None when they did."""

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


class Trainee:
    """A whole model and its optimizer on one device, built as `memplan profile` builds it,
    stepped by the runtime's train step under one activation policy at a time (use_policy)."""

    def __init__(self, cfg: Config, device: torch.device, seed: int = 0) -> None:
        self.cfg, self.device = cfg, device
        bf16 = training_dtype(cfg.cluster, cfg.train) == "bf16" and device.type == "cuda"
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        setup = whole_model_setup(cfg, self.dtype)
        self.model = build_stage_model(setup, device, seed)
        self.stepper = StageStep(self.model, setup, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.policy = "none"
        self.plan: Plan | None = None
        self.runtime: ActivationRuntime | None = None
        self.pool: HostBufferPool | None = None
        self.tracker: LiveBytes | None = None
        self.host_saved_bytes = [0]
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    # ---- policies ----
    def use_policy(self, policy: str, plan: Plan | None = None, cfg: Config | None = None) -> None:
        """Switch to `policy`; `plan` with the config it was made for for policy=plan."""
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; allowed: {', '.join(POLICIES)}")
        if policy == "plan" and (plan is None or cfg is None):
            raise ValueError("policy=plan needs the plan and its config")
        self._clear_policy()
        self.policy = policy
        layers = list(self.model.layers.values())
        if policy == "full":
            for layer in layers:
                layer.activation_policy = checkpointed_layer
        elif policy == "plan":
            assert plan is not None and cfg is not None
            self.plan = plan
            self.pool = (
                HostBufferPool(pin_memory=True)
                if self.device.type == "cuda"
                else HostTaggedPool(self.tracker)
            )
            # as the trainer's runtime applies it: keep-all layers get no engine (no hooks)
            self.runtime = ActivationRuntime(self.pool, plan.layout.activation_fetch)
            apply_layer_policies(layers, plan.layers, self.runtime)
            # one slab per layer, allocated now: the loop never allocates host memory
            slabs = {int(layer.layer_index): 1 for layer in layers}
            reserve_plan_host_memory(self.runtime, self.device, cfg.model, plan, slabs)

    def _clear_policy(self) -> None:
        if self.runtime is not None:
            self.runtime.remove()
        for layer in self.model.layers.values():
            layer.activation_policy = None
            layer.cheap_op_runner = None
        if self.pool is not None:
            self.pool.clear()
        self.runtime, self.pool, self.plan = None, None, None
        release_memory(self.device)

    @contextlib.contextmanager
    def _policy_context(self) -> Iterator[None]:
        if self.policy != "save_on_cpu":
            yield
            return
        with HostSaved(self.device, self.tracker, self.host_saved_bytes):
            yield

    # ---- steps ----
    def batch(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """One random sequence of seq_len tokens and its next-token targets."""
        vocab = self.cfg.model.vocab_size
        tokens = torch.randint(0, vocab, (1, seq_len + 1), generator=self.generator)
        tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def step(self, tokens: Tensor, targets: Tensor) -> StepOutput:
        """One optimizer step of the runtime's loop under the current policy."""
        with self._policy_context():
            return self.stepper.train_step(tokens, targets)

    def state_bytes(self) -> int:
        """Parameters and optimizer states alive between steps."""
        states = optimizer_state_tensors(self.optimizer)
        return sum(p.nbytes for p in self.params) + sum(t.nbytes for t in states)

    def run(self, seq_len: int, steps: int, track_memory: bool = True) -> Measurement:
        """`steps` timed steps of one sequence of seq_len tokens; a failed allocation ends
        them (failure set) and frees what the failed step held."""
        result = Measurement()
        try:
            self._run(seq_len, steps, track_memory, result)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            result.failure = "OOM: " + str(exc).splitlines()[0][:160]
        if result.failure is not None:
            self.optimizer.zero_grad(set_to_none=True)
            release_memory(self.device)
        return result

    def _run(self, seq_len: int, steps: int, track: bool, result: Measurement) -> None:
        tokens, targets = self.batch(seq_len)
        cuda = self.device.type == "cuda"
        tracker = LiveBytes() if track and not cuda else None
        self._track(tracker)
        states = self.state_bytes()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        outputs: list[StepOutput] = []
        try:
            with tracker if tracker is not None else contextlib.nullcontext():
                for _ in range(steps):
                    self.host_saved_bytes[0] = 0
                    seconds = timed(lambda: outputs.append(self.step(tokens, targets)), self.device)
                    result.seconds.append(seconds)
        finally:
            self._track(None)
        result.losses = [float(output.loss) for output in outputs]  # host sync, after the steps
        if cuda:
            result.device_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif tracker is not None:
            # states alive before + everything created since (an optimizer's first step
            # creates its moments inside the window: the tracker counts them)
            result.device_peak_bytes = states + tracker.peak["device"]
        if self.policy == "plan" and self.pool is not None:
            result.host_bytes = self.pool.allocated_bytes
        elif self.policy == "save_on_cpu":
            result.host_bytes = self.host_saved_bytes[0]

    def _track(self, tracker: LiveBytes | None) -> None:
        """Count host allocations (slabs, save_on_cpu copies) with `tracker` from now on."""
        self.tracker = tracker
        if isinstance(self.pool, HostTaggedPool):
            self.pool.tracker = tracker
