"""Schema of the `profile` node: `memplan profile`."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds


@dataclass(frozen=True)
class ProfileConfig:
    """`memplan profile`: predicted vs measured memory on this machine."""

    out: str | None = None
    """Also write the measurements as JSON here."""
    steps: int = 3
    """Training steps to run (the first warms up)."""
    scale: Literal["auto", "full", "small"] = "auto"
    """auto: the plan's per-rank dims on CUDA, a scaled-down model on the CPU; full: the
    plan's dims anywhere; small: scaled down anywhere (policies keep their fractions)."""
    seq_len: int | None = None
    """Local tokens per sequence of a scaled-down run; None: min(128, train.seq_len / sp)."""
    baseline: bool = False
    """Also time the same steps with every activation policy removed (offload overhead)."""
    mode: Literal["run", "trace"] = "run"
    """run: real steps on this machine's device; trace: one step of the plan's runtime at its
    real per-rank dims under FakeTensorMode with torch's MemTracker / FSDPMemTracker (no GPU,
    no memory): predicted vs traced peak per rank and phase (framework/measure/trace.py)."""

    def __post_init__(self) -> None:
        check_bounds(self, "profile", ("steps", "seq_len"), at_least=1)  # seq_len may be null
