"""Does the planner predict the memory a plan really uses? `python bench/estimator_accuracy.py`

For each configuration (model, layers, sequence length, plan) it makes the plan (the
planner's own, or a forced per-layer policy evaluated by the planner: none, full, selective,
offload, mix), runs it as `memplan profile` does (framework/measure/profile.py: the whole
model, bf16 weights + fp32 master and Adam moments on CUDA, fp32 on the CPU) and compares:
  - the step peak: the plan's gpu_peak_bytes (planner.memory.predict_stage_memory) against
    torch.cuda.max_memory_allocated (steps after the first); on the CPU against LiveBytes
    (bench/common.py: states + every storage created during the steps, the CPU's stand-in for
    max_memory_allocated);
  - model states + saved activations at the end of forward, predicted vs measured (what
    `memplan profile` reports as the CPU peak);
  - per layer: bytes the offload engine keeps on the device / holds on the host, against the
    planner's inventory (planner/activations.py).
Then a precision check: saved bytes per layer when the layers run (a) with bf16 weights (what
`memplan profile` and FSDP2's MixedPrecisionPolicy(param_dtype=bf16) run) and (b) with fp32
weights under bf16 autocast (what framework/runtime.LocalRuntime and ZeRO-0/1 run), against the
planner's 2-byte inventory. Prints tables, writes JSON (--out), exits 0.

    .venv/bin/python bench/estimator_accuracy.py                 # CPU: scaled-down models
    python3 bench/estimator_accuracy.py --device cuda --out estimator.json     # GPU defaults
    ... --case llama3_2_1b:0:65536:planner --case llama2_7b:4:8192:mix         # own cases
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DeviceInfo,
    Trainee,
    add_common_args,
    bench_config,
    describe_device,
    environment,
    environment_line,
    format_table,
    is_out_of_memory,
    percent,
    release_memory,
    resolve_device,
    seq_label,
    write_json,
)
from configs.schema import Config
from framework.components.loss import chunked_cross_entropy
from framework.measure.profile import (
    ProfileReport,
    build_stage_model,
    median_step_seconds,
    profile_setup,
    relative_error,
    run_profile,
)
from framework.measure.saved_bytes import OUTSIDE, SavedTensorLedger
from offload.engine import _is_parameter_cast
from planner.activations import LayerShape, layer_activation_bytes, outside_layers_bytes
from planner.assemble import build_plan
from planner.plan import LayerPlan, Layout, Plan, SolverInfo
from planner.units import format_bytes

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


@dataclass(frozen=True)
class Case:
    model: str
    layers: int
    seq_len: int
    policy: str

    @staticmethod
    def parse(spec: str) -> Case:
        try:
            model, layers, seq, policy = spec.split(":")
            case = Case(model, int(layers), int(seq), policy)
        except ValueError as exc:
            raise SystemExit(f"--case {spec!r}: expected MODEL:LAYERS:SEQ:POLICY") from exc
        if case.policy not in POLICY_CHOICES:
            raise SystemExit(f"--case {spec!r}: policy must be one of {', '.join(POLICY_CHOICES)}")
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
    if policy == "planner":
        from planner.search import make_plan

        return make_plan(cfg)
    return forced_plan(cfg, policy)


def policy_summary(plan: Plan) -> str:
    """'16x none' or '8x a0.50 r0.50 b1.00 + 8x full b0.00' (offload, recompute, anchor)."""
    counts: collections.Counter[str] = collections.Counter()
    for layer in plan.layers:
        if layer.recompute == "none" and not (
            layer.offload_fraction or layer.recompute_fraction or layer.anchor_offload_fraction
        ):
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


def run_case(case: Case, info: DeviceInfo, args: argparse.Namespace) -> dict[str, Any]:
    device = info.device
    cfg = bench_config(
        case.model, case.layers or None, case.seq_len, info, args.scale, args.override
    )
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
        report = run_profile(setup, plan, device, args.steps, args.seed)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        release_memory(device)
        row["failure"] = "OOM: " + str(exc).splitlines()[0][:160]
        return row
    measured_saved = report.activation_measured_bytes + report.state_measured_bytes
    row |= {
        "profile": report.to_dict(),
        "saved_predicted_bytes": report.peak_predicted_bytes,
        "saved_measured_bytes": measured_saved,
        "layer_max_abs_error": layer_errors(report),
        "step_seconds": median_step_seconds(report.step_seconds),
    }
    if device.type == "cuda":
        row["measured_peak_bytes"] = report.peak_measured_bytes
        row["peak_source"] = "torch.cuda.max_memory_allocated (steps after the first)"
    else:
        trainee = Trainee(cfg, device, args.seed)
        trainee.use_policy("plan", plan, cfg)
        trainee.run(case.seq_len, 1, track_memory=False)  # optimizer states exist afterwards
        live = trainee.run(case.seq_len, args.steps)
        row["measured_peak_bytes"] = live.device_peak_bytes
        row["peak_source"] = "LiveBytes: states + storages created during the steps (CPU)"
        del trainee
    row["peak_error"] = relative_error(row["measured_peak_bytes"], plan.memory.gpu_peak_bytes)
    release_memory(device)
    return row


def case_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "case",
        "plan",
        "peak pred",
        "peak meas",
        "err",
        "states+saved pred",
        "meas",
        "err",
        "layer dev |err|",
        "layer host |err|",
        "step s",
    ]
    body = []
    for row in rows:
        if "failure" in row:
            body.append(
                [
                    row["case"],
                    row["policy"],
                    format_bytes(row["predicted_peak_bytes"]),
                    row["failure"],
                ]
                + [""] * 7
            )
            continue
        worst = row["layer_max_abs_error"]
        body.append(
            [
                row["case"],
                row["policy"],
                format_bytes(row["predicted_peak_bytes"]),
                format_bytes(row["measured_peak_bytes"]),
                percent(row["peak_error"]),
                format_bytes(row["saved_predicted_bytes"]),
                format_bytes(row["saved_measured_bytes"]),
                percent(relative_error(row["saved_measured_bytes"], row["saved_predicted_bytes"])),
                "-" if worst["device_bytes"] is None else f"{100 * worst['device_bytes']:.2f}%",
                "-" if worst["host_bytes"] is None else f"{100 * worst['host_bytes']:.2f}%",
                f"{row['step_seconds']:.3f}",
            ]
        )
    return format_table(headers, body)


# ---- precision check ----------------------------------------------------------------------
PRECISIONS = {
    "bf16 weights": "memplan profile; FSDP2 MixedPrecisionPolicy(param_dtype=bf16)",
    "fp32 weights + bf16 autocast": "framework/runtime.LocalRuntime; ParallelRuntime ZeRO-0/1",
}


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
    device_type = tokens.device.type
    with (
        torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        hidden = model(tokens)
        chunked_cross_entropy(hidden, model.output_weight(), targets, 4096)
    for hook in hooks:
        hook.remove()
    by_kind: dict[str, int] = collections.defaultdict(int)
    for kind, nbytes in sizes.values():
        by_kind[kind.removeprefix("torch.")] += nbytes
    return {"saved_bytes_by_kind": dict(by_kind), "layer_input_dtypes": inputs}


def precision_check(info: DeviceInfo, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Saved bytes per layer under the two precision setups vs the planner (bf16, 2 bytes)."""
    device = info.device
    seq = args.precision_seq_len or (4096 if device.type == "cuda" else 128)
    cfg = bench_config("llama3_2_1b", 2, seq, info, args.scale, args.override)
    model_cfg = cfg.model
    shape = LayerShape.of(model_cfg, 2)
    none = LayerPlan(0, 0, 0.0, "none", 0.0)
    predicted_layer = layer_activation_bytes(shape, 1, seq, none).device_bytes
    predicted_outside = outside_layers_bytes(model_cfg, 1, seq, 2)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (1, seq + 1), generator=generator)
    tokens, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    rows = []
    for name, who in PRECISIONS.items():
        autocast = "autocast" in name
        setup = profile_setup(cfg, forced_plan(cfg, "none"), device, scale="full")
        setup = dataclasses.replace(setup, dtype=torch.float32 if autocast else torch.bfloat16)
        model = build_stage_model(setup, device, args.seed)
        with (
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
            SavedTensorLedger(model) as ledger,
        ):
            hidden = model(tokens)
            chunked_cross_entropy(hidden, model.output_weight(), targets, 4096)
        per_layer = ledger.per_layer_bytes()
        layers = [per_layer.get(i, 0) for i in range(model_cfg.num_layers)]
        outside = per_layer.get(OUTSIDE, 0) + ledger.shared_bytes()
        del ledger, hidden
        census = _census(model, tokens, targets, autocast)
        rows.append(
            {
                "setup": name,
                "runs_in": who,
                "seq_len": seq,
                "layer_measured_bytes": layers,
                "layer_predicted_bytes": predicted_layer,
                "outside_measured_bytes": outside,
                "outside_predicted_bytes": predicted_outside,
                **census,
            }
        )
        del model
        release_memory(device)
    return rows


def precision_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "setup (runs in)",
        "layer saved meas",
        "pred (bf16)",
        "ratio",
        "outside meas",
        "pred",
        "layer input dtypes",
        "saved by kind (one forward)",
    ]
    body = []
    for row in rows:
        layer = max(row["layer_measured_bytes"])
        kinds = ", ".join(
            f"{k} {format_bytes(v)}" for k, v in sorted(row["saved_bytes_by_kind"].items())
        )
        body.append(
            [
                f"{row['setup']} ({row['runs_in']})",
                format_bytes(layer),
                format_bytes(row["layer_predicted_bytes"]),
                f"{layer / row['layer_predicted_bytes']:.3f}",
                format_bytes(row["outside_measured_bytes"]),
                format_bytes(row["outside_predicted_bytes"]),
                "/".join(sorted(set(row["layer_input_dtypes"]))),
                kinds,
            ]
        )
    return format_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--case",
        action="append",
        metavar="MODEL:LAYERS:SEQ:POLICY",
        help="a configuration (repeatable; LAYERS 0 = the preset's; POLICY one of "
        + ", ".join(POLICY_CHOICES)
        + "); default: a GPU or a CPU list",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per case (first warms up)")
    parser.add_argument("--no-precision-check", action="store_true")
    parser.add_argument(
        "--precision-seq-len", type=int, help="tokens of the precision check (GPU 4096, CPU 128)"
    )
    parser.set_defaults(budget_bytes=36 * 2**20)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    info = describe_device(device, args.budget_bytes, args.peak_tflops)
    specs = args.case or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    cases = [Case.parse(spec) for spec in specs]
    env = environment(info)
    print(f"estimator accuracy | {environment_line(env)}")
    rows = []
    for case in cases:
        rows.append(run_case(case, info, args))
        print(f"  done: {case.name}", flush=True)
    print("\npredicted vs measured memory per configuration (one sequence per step)")
    print(case_table(rows))
    ok = [r for r in rows if "failure" not in r]
    within = [r for r in ok if abs(r["peak_error"]) <= PEAK_TOLERANCE]
    source = ok[0]["peak_source"] if ok else "-"
    print(
        f"peak within ±{PEAK_TOLERANCE:.0%}: {len(within)} of {len(ok)} configurations that "
        f"ran ({len(rows) - len(ok)} failed); measured = {source}"
    )
    precision = []
    if not args.no_precision_check:
        precision = precision_check(info, args)
        print("\nsaved activations per decoder layer by precision setup (llama3_2_1b shape, "
              f"2 layers, {precision[0]['seq_len']} tokens, no policy)")  # fmt: skip
        print(precision_table(precision))
    write_json(args.out, {"environment": env, "cases": rows, "precision_check": precision})
    return 0


if __name__ == "__main__":
    sys.exit(main())
