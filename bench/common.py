"""What the GPU benchmarks share (bench/estimator_accuracy.py, longest_sequence.py,
throughput.py): the device and the cluster config that describes it to the planner, a
whole-model training step under one of four activation policies, peak-memory measurement,
tables and JSON.

Policies (POLICIES):
    none         every saved activation stays on the device
    full         torch.utils.checkpoint (non-reentrant) around every decoder layer: the usual
                 full activation checkpointing baseline (torchtitan's "full" AC)
    save_on_cpu  torch.autograd.graph.save_on_cpu: every saved tensor goes to host memory
                 (pinned on CUDA) and comes back when backward needs it
    plan         memplan: make_plan(cfg) for a cluster that describes this device, applied with
                 offload.apply_activation_plan (host slabs reserved from the plan up front)

The model is built as `memplan profile` builds it (framework/measure/profile.py): bf16 weights with
fp32 master weights and Adam moments on CUDA (16 bytes per parameter, the plan's accounting),
fp32 with torch AdamW on the CPU.

Peak memory: on CUDA torch.cuda.max_memory_allocated after a reset. On the CPU, LiveBytes
emulates it: every storage created by an aten op while it is active counts until it dies,
added to the parameters and optimizer states alive before; storages created for the host
(save_on_cpu's copies, host slabs) are counted apart. Kernels' internal scratch buffers
(never visible as op outputs) are not seen on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from configs.schema import Config  # noqa: E402
from framework.components.loss import chunked_cross_entropy  # noqa: E402
from framework.measure.profile import (  # noqa: E402
    MixedPrecisionAdamW,
    ProfileSetup,
    build_stage_model,
    scale_down,
)
from offload import (  # noqa: E402
    ActivationRuntime,
    HostBufferPool,
    apply_activation_plan,
    reserve_plan_host_memory,
)
from planner.costs import training_dtype  # noqa: E402
from planner.flops import training_flops_per_token  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.units import GIB  # noqa: E402

POLICIES = ("none", "full", "save_on_cpu", "plan")
POLICY_NOTES = {
    "none": "no recomputation: every saved activation stays on the device",
    "full": "torch.utils.checkpoint (non-reentrant) around every decoder layer",
    "save_on_cpu": "torch.autograd.graph.save_on_cpu: every saved tensor on the host",
    "plan": "memplan: make_plan for this device, offload.apply_activation_plan",
}
DEVICE_SPECS = {
    # name fragment: (dense bf16 TFLOP/s, HBM GB/s) from the datasheets (SXM parts)
    "H200": (989.0, 4800.0),
    "H100": (989.0, 3350.0),
    "A100": (312.0, 2039.0),
}


# ---- the device ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """The device the benchmark runs on, as the planner should see it."""

    device: torch.device
    name: str
    memory_bytes: int
    """CUDA: the GPU's total memory. CPU: the emulated device budget (--budget-bytes)."""
    host_bytes: int
    """Host RAM available at start (MemAvailable)."""
    peak_tflops: float
    """Dense peak in the training dtype (bf16 on CUDA, fp32 on the CPU)."""
    hbm_gbps: float | None
    emulated: bool
    """True on the CPU: memory limits are checked against measured peaks, not enforced."""


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (total physical memory where that is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def describe_device(
    device: torch.device, budget_bytes: int, peak_tflops: float | None
) -> DeviceInfo:
    """What the planner is told about this device (see cluster_overrides)."""
    host = available_host_bytes()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        spec = next((v for k, v in DEVICE_SPECS.items() if k in props.name), None)
        if peak_tflops is None and spec is None:
            raise SystemExit(f"unknown GPU {props.name!r}: pass --peak-tflops (dense bf16)")
        return DeviceInfo(
            device=device,
            name=props.name,
            memory_bytes=props.total_memory,
            host_bytes=host,
            peak_tflops=peak_tflops or spec[0],
            hbm_gbps=spec[1] if spec else None,
            emulated=False,
        )
    return DeviceInfo(
        device=device,
        name=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        memory_bytes=budget_bytes,
        host_bytes=host,
        peak_tflops=peak_tflops or 0.16,  # configs/cluster/cpu.yaml: 2 cores x AVX2 FMA fp32
        hbm_gbps=None,
        emulated=True,
    )


def cluster_overrides(info: DeviceInfo) -> list[str]:
    """Config overrides of a one-device cluster that is this device. On the CPU the device
    is the emulated budget, activation offload is switched on (planner.offload=on), so the
    plan uses the same tools as on a GPU, and no allocator reserve is kept."""
    host_gib = info.host_bytes / GIB
    if info.device.type == "cuda":
        overrides = [
            "cluster=h100_1x",
            f"cluster.gpu_memory_gib={info.memory_bytes / GIB:.3f}",
            f"cluster.host_memory_gib={host_gib:.3f}",
            f"cluster.peak_tflops={info.peak_tflops}",
        ]
        if info.hbm_gbps:
            overrides.append(f"cluster.hbm_bandwidth_gbps={info.hbm_gbps}")
        return overrides
    return [
        "cluster=cpu",
        f"cluster.gpu_memory_gib={info.memory_bytes / GIB:.6f}",
        f"cluster.host_memory_gib={host_gib:.3f}",
        f"cluster.peak_tflops={info.peak_tflops}",
        "planner.offload=on",
        # LiveBytes counts exact allocations: there is no caching allocator to fragment, so
        # the plan gets the same budget the measured baselines are held to
        "planner.fragmentation_reserve_fraction=0",
    ]


def bench_config(
    model: str,
    layers: int | None,
    seq_len: int,
    info: DeviceInfo,
    scale: str,
    overrides: Sequence[str] = (),
) -> Config:
    """The config a user would compose for one sequence of seq_len tokens on this device;
    scale=small replaces the model by framework.measure.profile.scale_down of it (the CPU sizes)."""
    from launch.compose import compose_config

    args = [
        f"model={model}",
        *cluster_overrides(info),
        f"train.seq_len={seq_len}",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "logging.wandb=false",
    ]
    if layers:
        args.append(f"model.num_layers={layers}")
    cfg = compose_config([*args, *overrides])
    if resolve_scale(scale, info.device) == "small":
        cfg = dataclasses.replace(cfg, model=scale_down(cfg.model))
    return cfg


def with_seq_len(cfg: Config, seq_len: int) -> Config:
    """The same config for another sequence length (no re-composition)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len))


def resolve_scale(scale: str, device: torch.device) -> str:
    """auto: the real dims on CUDA, framework.measure.profile.scale_down on the CPU."""
    if scale == "auto":
        return "full" if device.type == "cuda" else "small"
    return scale


def environment(info: DeviceInfo) -> dict[str, Any]:
    """Where and when the numbers were taken (goes into every JSON)."""
    return {
        "device": info.name,
        "device_type": info.device.type,
        "device_memory_bytes": info.memory_bytes,
        "memory_emulated": info.emulated,
        "host_available_bytes": info.host_bytes,
        "peak_tflops": info.peak_tflops,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }


def environment_line(env: dict[str, Any]) -> str:
    memory = f"{env['device_memory_bytes'] / GIB:.2f} GiB"
    if env["memory_emulated"]:
        memory += " (emulated budget: measured peaks are checked against it)"
    return (
        f"{env['device']} | memory {memory} | host available "
        f"{env['host_available_bytes'] / GIB:.1f} GiB | torch {env['torch']} | "
        f"{env['cpu_count']} CPUs, load average {env['load_average']:.1f}"
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--scale",
        default="auto",
        choices=["auto", "full", "small"],
        help="auto: the model's real dims on CUDA, scaled down "
        "(framework.measure.profile.scale_down) on the CPU",
    )
    parser.add_argument(
        "--budget-bytes",
        type=int,
        default=64 * 2**20,
        help="CPU only: the emulated device memory (the planner plans for it; a length is "
        "trainable when the measured peak fits in it)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="dense peak of the device (default: from its name)"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra memplan config override (repeatable), e.g. model.hidden_size=64",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {target}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def seq_label(tokens: int) -> str:
    """65536 -> '64K'; 384 -> '384'."""
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def percent(error: float | None) -> str:
    return "-" if error is None else f"{100 * error:+.2f}%"


def mfu(cfg: Config, seq_len: int, tokens_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation with planner/flops.py's formula (recomputation not counted)."""
    flops = training_flops_per_token(cfg.model, seq_len) * tokens_per_second
    return flops / (peak_tflops * 1e12)


# ---- CPU peak memory ------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by aten ops while active and still alive, and their
    peak, split into device and host (storages created inside `host()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self._sizes: dict[int, int] = {}
        self._host_depth = 0

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created in here are host memory."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    def _release(self, key: int, kind: str, size: int) -> None:
        self._sizes.pop(key, None)
        self.live[kind] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if key in inputs or key in self._sizes or size == 0:
                continue  # a view, an in-place result or a storage seen before
            kind = "host" if self._host_depth else "device"
            self._sizes[key] = size
            self.live[kind] += size
            self.peak[kind] = max(self.peak[kind], self.live[kind])
            weakref.finalize(storage, self._release, key, kind, size)
        return out


class _TaggedPool(HostBufferPool):
    """A host pool whose slabs LiveBytes counts as host memory (the CPU emulation)."""

    def __init__(self, tracker: LiveBytes | None) -> None:
        super().__init__(pin_memory=False)
        self.tracker = tracker

    def _allocate(self, capacity: int) -> Tensor:
        if self.tracker is None:
            return super()._allocate(capacity)
        with self.tracker.host():
            return super()._allocate(capacity)


class _HostSaved(torch.autograd.graph.saved_tensors_hooks):
    """The save_on_cpu policy, counting the bytes it moves to the host.

    CUDA: torch.autograd.graph.save_on_cpu(pin_memory=True) itself. CPU: torch's hooks are a
    no-op there (tensor.cpu() returns the tensor), so the emulation does what they do on a
    GPU: pack copies the tensor into host memory (a clone LiveBytes counts as host) and lets
    the device storage go; unpack copies it back onto the device for backward.
    """

    def __init__(self, device: torch.device, tracker: LiveBytes | None, counter: list[int]) -> None:
        if device.type == "cuda":
            inner = torch.autograd.graph.save_on_cpu(pin_memory=True)
            pack, unpack = inner.pack_hook, inner.unpack_hook
        else:

            def pack(tensor: Tensor) -> Tensor:
                with tracker.host() if tracker is not None else contextlib.nullcontext():
                    return tensor.clone()

            def unpack(host: Tensor) -> Tensor:
                return host.clone()

        def counted_pack(tensor: Tensor) -> Any:
            counter[0] += tensor.numel() * tensor.element_size()
            return pack(tensor)

        super().__init__(counted_pack, unpack)


# ---- the training step ----------------------------------------------------------------------
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


@dataclass
class Measurement:
    """Some training steps at one length under one policy."""

    seconds: list[float] = field(default_factory=list)
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
    stepped under one activation policy at a time (use_policy)."""

    def __init__(self, cfg: Config, device: torch.device, seed: int = 0) -> None:
        self.cfg, self.device = cfg, device
        bf16 = training_dtype(cfg.cluster, cfg.train) == "bf16" and device.type == "cuda"
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        setup = ProfileSetup(
            model=cfg.model,
            policies=(),
            plan_indices=(),
            stage=0,
            num_stages=1,
            micro_batch=1,
            seq_local=cfg.train.seq_len,
            dtype=self.dtype,
            scaled=False,
            notes=(),
        )
        self.model = build_stage_model(setup, device, seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: Any = (
            MixedPrecisionAdamW(self.params, lr=1e-5)
            if bf16
            else torch.optim.AdamW(self.params, lr=1e-5)
        )
        self.policy = "none"
        self.plan: Plan | None = None
        self.runtime: ActivationRuntime | None = None
        self.pool: HostBufferPool | None = None
        self.tracker: LiveBytes | None = None
        self.host_saved_bytes = [0]
        self.generator = torch.Generator().manual_seed(seed)

    # ---- policies ----
    def use_policy(self, policy: str, plan: Plan | None = None, cfg: Config | None = None) -> None:
        """Switch to `policy`; `plan` with the config it was made for for policy=plan."""
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; allowed: {', '.join(POLICIES)}")
        self._clear_policy()
        self.policy = policy
        layers = list(self.model.layers.values())
        if policy == "full":
            for layer in layers:
                layer.activation_policy = checkpointed_layer
        elif policy == "plan":
            if plan is None or cfg is None:
                raise ValueError("policy=plan needs the plan and its config")
            self.plan = plan
            self.pool = (
                HostBufferPool(pin_memory=True)
                if self.device.type == "cuda"
                else _TaggedPool(self.tracker)
            )
            self.runtime = apply_activation_plan(layers, plan.layers, self.pool)
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
        with _HostSaved(self.device, self.tracker, self.host_saved_bytes):
            yield

    # ---- steps ----
    def batch(self, seq_len: int) -> tuple[Tensor, Tensor]:
        vocab = self.cfg.model.vocab_size
        tokens = torch.randint(0, vocab, (1, seq_len + 1), generator=self.generator)
        tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        """Forward, chunked cross-entropy, backward and the optimizer step."""
        with self._policy_context():
            hidden = self.model(tokens)
            loss = chunked_cross_entropy(
                hidden, self.model.output_weight(), targets, self.cfg.train.loss_chunk_tokens
            )
            del hidden
            loss.backward()
        del loss
        self.optimizer.step()
        for param in self.params:
            param.grad = None

    def state_bytes(self) -> int:
        """Parameters and optimizer states alive between steps."""
        if isinstance(self.optimizer, MixedPrecisionAdamW):
            states = self.optimizer.state_tensors()
        else:
            states = [
                v
                for s in self.optimizer.state.values()
                for v in s.values()
                if isinstance(v, Tensor) and v.dim() > 0
            ]
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
            for param in self.params:
                param.grad = None
            release_memory(self.device)
        return result

    def _run(self, seq_len: int, steps: int, track: bool, result: Measurement) -> None:
        tokens, targets = self.batch(seq_len)
        cuda = self.device.type == "cuda"
        tracker = LiveBytes() if track and not cuda else None
        self.tracker = tracker
        if isinstance(self.pool, _TaggedPool):
            self.pool.tracker = tracker
        states = self.state_bytes()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with tracker if tracker is not None else contextlib.nullcontext():
                for _ in range(steps):
                    self.host_saved_bytes[0] = 0
                    start = time.perf_counter()
                    self.step(tokens, targets)
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    result.seconds.append(time.perf_counter() - start)
        finally:
            self.tracker = None
            if isinstance(self.pool, _TaggedPool):
                self.pool.tracker = None
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


def release_memory(device: torch.device) -> None:
    """Free what a finished or failed step left behind (cached CUDA blocks included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:  # cached pinned blocks of save_on_cpu
            host_empty()
