"""Does the planner predict the memory a plan really uses? (bench/estimator_accuracy.py)

    row = run_case(case, cfg, info, steps, seed)      # one configuration, as a JSON row
    rows = precision_check(cfg, info, seed)           # saved bytes by precision setup

A case makes its plan (the planner's own, or a forced per-layer policy evaluated by the
planner: none, full, selective, offload, mix), runs it as `memplan profile` does
(framework/measure/profile.py, the whole model) and compares:
  - the step peak: the plan's gpu_peak_bytes against torch.cuda.max_memory_allocated (steps
    after the first); on the CPU against LiveBytes (framework/measure/live_bytes.py: states +
    every storage created during the steps, via framework/measure/trainee.py);
  - model states + saved activations at the end of forward, predicted vs measured;
  - per layer: bytes the offload engine keeps on the device / holds on the host, against the
    planner's inventory (planner/activations.py).
The precision check measures the saved bytes per layer when the layers run (a) with bf16
weights (what `memplan profile` and FSDP2's MixedPrecisionPolicy(param_dtype=bf16) run) and
(b) with fp32 weights under bf16 autocast (what framework/runtime/local.py's LocalRuntime and
ZeRO-0/1 run), against the planner's 2-byte inventory.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from configs.schema import Config
from framework.measure.device import DeviceInfo
from framework.measure.profile import run_profile
from framework.measure.report import ProfileReport, median_step_seconds, relative_error
from framework.measure.saved_bytes import OUTSIDE, SavedTensorLedger
from framework.measure.setup import build_stage_model, profile_setup, whole_model_setup
from framework.measure.tables import seq_label
from framework.measure.trainee import Trainee, is_out_of_memory, release_memory
from offload.engine import _is_parameter_cast
from planner.activations import LayerShape, layer_activation_bytes, outside_layers_bytes
from planner.assemble import build_plan
from planner.plan import LayerPlan, Layout, Plan, SolverInfo

FORCED = {
    # offload_fraction, recompute, recompute_fraction, anchor_offload_fraction
    "none": [(0.0, "none", 0.0, 0.0)],
    "full": [(0.0, "full", 0.0, 0.0)],
    "selective": [(0.0, "selective", 0.0, 0.0)],
    "offload": [(0.5, "none", 0.5, 1.0)],  # MEMO: anchors swapped, the rest half/half
    "mix": [
        (0.3, "none", 0.3, 0.5),
        (0.0, "selective", 0.5, 1.0),
        (0.0, "full", 0.0, 1.0),
        (0.5, "none", 0.0, 0.0),
    ],
}
POLICY_CHOICES = ("planner", *FORCED)
GPU_CASES = [
    "llama3_2_1b:0:4096:planner",
    "llama3_2_1b:0:16384:none",
    "llama3_2_1b:0:32768:mix",
    "llama3_2_1b:0:65536:full",
    "llama3_2_1b:0:65536:planner",
    "llama2_7b:4:8192:planner",
    "llama2_7b:4:32768:offload",
]
CPU_CASES = [
    "llama3_2_1b:4:128:planner",
    "llama3_2_1b:4:256:none",
    "llama3_2_1b:4:256:mix",
    "llama3_2_1b:4:512:full",
    "llama3_2_1b:4:512:planner",
    "llama2_7b:2:256:planner",
    "llama2_7b:2:256:offload",
]
PEAK_TOLERANCE = 0.05
PRECISIONS = {
    "bf16 weights": "memplan profile; FSDP2 MixedPrecisionPolicy(param_dtype=bf16)",
    "fp32 weights + bf16 autocast": "framework/runtime.LocalRuntime; ParallelRuntime ZeRO-0/1",
}


@dataclass(frozen=True)
class Case:
    """One configuration: a model preset, its layer count (0: the preset's), a sequence
    length and a plan (POLICY_CHOICES)."""

    model: str
    layers: int
    seq_len: int
    policy: str

    @staticmethod
    def parse(spec: str) -> Case:
        """MODEL:LAYERS:SEQ:POLICY; ValueError naming the spec when it is not one."""
        try:
            model, layers, seq, policy = spec.split(":")
            case = Case(model, int(layers), int(seq), policy)
        except ValueError as exc:
            raise ValueError(f"--case {spec!r}: expected MODEL:LAYERS:SEQ:POLICY") from exc
        if case.policy not in POLICY_CHOICES:
            raise ValueError(f"--case {spec!r}: policy must be one of {', '.join(POLICY_CHOICES)}")
        return case

    @property
    def name(self) -> str:
        layers = f"/{self.layers}L" if self.layers else ""
        return f"{self.model}{layers} {seq_label(self.seq_len)} {self.policy}"


def forced_plan(cfg: Config, policy: str) -> Plan:
    """The per-layer policy `policy` on one device, with the planner's predicted memory."""
    mixes = FORCED[policy]
    layers = [LayerPlan(i, 0, *mixes[i % len(mixes)]) for i in range(cfg.model.num_layers)]
    layout = Layout(
        dp=1,
        tp=1,
        pp=1,
        sp=1,
        zero_stage=0,
        micro_batch_size=1,
        num_microbatches=1,
        pp_schedule="none",
        zero_backend="fsdp2",
    )
    return build_plan(cfg, layout, layers, SolverInfo("forced", policy, 0.0, 0))


def make_case_plan(cfg: Config, policy: str) -> Plan:
    """The planner's plan (policy planner) or a forced one."""
    if policy == "planner":
        from planner.make import make_plan  # the MILP search: imported only where used

        return make_plan(cfg)
    return forced_plan(cfg, policy)


def policy_summary(plan: Plan) -> str:
    """'16x none' or '8x a0.50 r0.50 b1.00 + 8x full b0.00' (offload, recompute, anchor)."""
    counts: collections.Counter[str] = collections.Counter()
    for layer in plan.layers:
        if layer.keeps_everything:
            counts["none"] += 1
            continue
        label = f"a{layer.offload_fraction:.2f} r{layer.recompute_fraction:.2f}"
        if layer.recompute == "full":
            label = "full"
        elif layer.recompute == "selective":
            label += " sel"
        counts[f"{label} b{layer.anchor_offload_fraction:.2f}"] += 1
    return " + ".join(f"{n}x {label}" for label, n in counts.items())


def layer_errors(report: ProfileReport) -> dict[str, float | None]:
    """Largest |measured - predicted| / predicted over the layers, per kind of bytes."""
    worst: dict[str, float | None] = {}
    for kind in ("device_bytes", "host_bytes", "recomputed_bytes"):
        errors = [
            relative_error(getattr(row.measured, kind), getattr(row.predicted, kind))
            for row in report.rows
        ]
        finite = [abs(e) for e in errors if e is not None]
        worst[kind] = max(finite) if finite else None
    return worst


def run_case(case: Case, cfg: Config, info: DeviceInfo, steps: int, seed: int) -> dict[str, Any]:
    """Plan `cfg` as the case says, run it, and compare (module doc); a JSON row."""
    device = info.device
    plan = make_case_plan(cfg, case.policy)
    row: dict[str, Any] = {
        "case": case.name,
        "spec": dataclasses.asdict(case),
        "model": dataclasses.asdict(cfg.model),
        "policy": policy_summary(plan),
        "plan_memory": dataclasses.asdict(plan.memory),
        "predicted_peak_bytes": plan.memory.gpu_peak_bytes,
        "layers": [dataclasses.asdict(layer) for layer in plan.layers],
    }
    setup = profile_setup(cfg, plan, device, scale="full")
    try:
        report = run_profile(setup, plan, device, steps, seed)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        release_memory(device)
        return row | {"failure": "OOM: " + str(exc).splitlines()[0][:160]}
    row |= {
        "profile": report.to_dict(),
        "saved_predicted_bytes": report.peak_predicted_bytes,
        "saved_measured_bytes": report.activation_measured_bytes + report.state_measured_bytes,
        "layer_max_abs_error": layer_errors(report),
        "step_seconds": median_step_seconds(report.step_seconds),
    }
    if device.type == "cuda":
        row["measured_peak_bytes"] = report.peak_measured_bytes
        row["peak_source"] = "torch.cuda.max_memory_allocated (steps after the first)"
    else:
        trainee = Trainee(cfg, device, seed)
        trainee.use_policy("plan", plan, cfg)
        trainee.run(case.seq_len, 1, track_memory=False)  # optimizer states exist afterwards
        row["measured_peak_bytes"] = trainee.run(case.seq_len, steps).device_peak_bytes
        row["peak_source"] = "LiveBytes: states + storages created during the steps (CPU)"
        del trainee
    row["peak_error"] = relative_error(row["measured_peak_bytes"], plan.memory.gpu_peak_bytes)
    release_memory(device)
    return row


def _census(model: Any, tokens: torch.Tensor, targets: torch.Tensor, autocast: bool) -> dict:
    """Saved storages of one forward (each once) by dtype, autocast weight copies apart,
    and the dtype of every decoder layer's input."""
    sizes: dict[int, tuple[str, int]] = {}
    keepalive = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in params or key in sizes or not storage.nbytes():
            return tensor
        kind = "weight copies" if _is_parameter_cast(tensor) else str(tensor.dtype)
        sizes[key] = (kind, storage.nbytes())
        keepalive.append(tensor)
        return tensor

    inputs: list[str] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args: inputs.append(str(args[0].dtype)))
        for layer in model.layers.values()
    ]
    with (
        torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model.loss(model(tokens), targets)
    for hook in hooks:
        hook.remove()
    by_kind: dict[str, int] = collections.defaultdict(int)
    for kind, nbytes in sizes.values():
        by_kind[kind.removeprefix("torch.")] += nbytes
    return {"saved_bytes_by_kind": dict(by_kind), "layer_input_dtypes": inputs}


def _precision_row(
    cfg: Config, name: str, tokens: torch.Tensor, targets: torch.Tensor, seed: int
) -> dict[str, Any]:
    """Saved bytes per layer and outside them of one forward under precision setup `name`."""
    autocast = "autocast" in name
    setup = whole_model_setup(cfg, torch.float32 if autocast else torch.bfloat16)
    model = build_stage_model(setup, tokens.device, seed)
    with (
        torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast),
        SavedTensorLedger(model) as ledger,
    ):
        model.loss(model(tokens), targets)
    per_layer = ledger.per_layer_bytes()
    return {
        "layer_measured_bytes": [per_layer.get(i, 0) for i in range(cfg.model.num_layers)],
        "outside_measured_bytes": per_layer.get(OUTSIDE, 0) + ledger.shared_bytes(),
        **_census(model, tokens, targets, autocast),
    }


def precision_check(cfg: Config, info: DeviceInfo, seed: int) -> list[dict[str, Any]]:
    """Saved bytes per layer under the two precision setups (PRECISIONS) vs the planner
    (bf16, 2 bytes), for one sequence of cfg.train.seq_len tokens and no policy."""
    device, seq = info.device, cfg.train.seq_len
    none = LayerPlan(0, 0, 0.0, "none", 0.0)
    predicted_layer = layer_activation_bytes(LayerShape.of(cfg.model, 2), 1, seq, none)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=generator)
    tokens, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    rows = []
    for name, who in PRECISIONS.items():
        measured = _precision_row(cfg, name, tokens, targets, seed)
        rows.append(
            {
                "setup": name,
                "runs_in": who,
                "seq_len": seq,
                "layer_predicted_bytes": predicted_layer.device_bytes,
                "outside_predicted_bytes": outside_layers_bytes(cfg.model, 1, seq, 2),
                **measured,
            }
        )
        release_memory(device)
    return rows
