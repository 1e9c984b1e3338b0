"""What `memplan profile` reports: predicted vs measured bytes per layer, the step peak and
step times (ProfileReport, written as JSON by profile.out=PATH), and the small numeric
helpers the report and the benchmarks print with."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

from framework.measure.setup import ProfileSetup
from offload import LayerActivationStats
from planner.activations import LayerActivationBytes
from planner.plan import LayerPlan


@dataclass(frozen=True)
class LayerRow:
    """Predicted vs measured saved-activation bytes of one layer (one micro-batch)."""

    index: int
    policy: LayerPlan
    predicted: LayerActivationBytes
    measured: LayerActivationStats


@dataclass
class ProfileReport:
    """Everything `memplan profile` prints (and writes as JSON)."""

    setup: ProfileSetup
    device: str
    rows: list[LayerRow]
    peak_measured_bytes: int
    peak_predicted_bytes: int
    """Model states + saved activations predicted for exactly what ran."""
    plan_peak_bytes: int
    """The plan's gpu_peak_bytes (for the plan's real dims and layout)."""
    activation_measured_bytes: int
    state_measured_bytes: int
    step_seconds: list[float]
    host_slab_allocations: int
    host_slab_allocations_after_first_step: int
    baseline_step_seconds: list[float] = field(default_factory=list)
    baseline_peak_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        setup = self.setup
        return {
            "device": self.device,
            "model": dataclasses.asdict(setup.model),
            "stage": setup.stage,
            "num_stages": setup.num_stages,
            "micro_batch": setup.micro_batch,
            "seq_local": setup.seq_local,
            "dtype": str(setup.dtype).removeprefix("torch."),
            "scaled": setup.scaled,
            "notes": list(setup.notes),
            "layers": [
                {
                    "index": row.index,
                    "policy": dataclasses.asdict(row.policy) | {"index": row.index},
                    "predicted": dataclasses.asdict(row.predicted),
                    "measured": dataclasses.asdict(row.measured),
                }
                for row in self.rows
            ],
            "peak": {
                "measured_bytes": self.peak_measured_bytes,
                "predicted_bytes": self.peak_predicted_bytes,
                "plan_gpu_peak_bytes": self.plan_peak_bytes,
                "activation_measured_bytes": self.activation_measured_bytes,
                "state_measured_bytes": self.state_measured_bytes,
            },
            "step_seconds": self.step_seconds,
            "host_slab_allocations": self.host_slab_allocations,
            "host_slab_allocations_after_first_step": self.host_slab_allocations_after_first_step,
            "baseline": {
                "step_seconds": self.baseline_step_seconds,
                "peak_bytes": self.baseline_peak_bytes,
            },
        }


def relative_error(measured: int, predicted: int) -> float | None:
    """(measured - predicted) / predicted; None when nothing was predicted."""
    if predicted == 0:
        return None if measured == 0 else float("inf")
    return (measured - predicted) / predicted


def format_error(measured: int, predicted: int) -> str:
    """Signed relative difference, '-' when both are zero, 'n/a' when only the prediction is."""
    error = relative_error(measured, predicted)
    if error is None:
        return "-"
    if error == float("inf"):
        return "n/a"
    return f"{100 * error:+.2f}%"


def median_step_seconds(times: list[float]) -> float:
    """Median step time, leaving out the first (warm-up) step when there are others."""
    return statistics.median(times[1:] if len(times) > 1 else times)
