"""Schema of the `plan` node: plan files written and reused."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanIOConfig:
    """Where `memplan plan` writes, and which plan `memplan train` reuses."""

    out: str | None = None
    """Also write the plan JSON here."""
    path: str | None = None
    """Use this plan JSON instead of planning (train, profile, job)."""
    plot: str | None = None
    """Write a PNG chart of the memory breakdown and per-layer policies here."""
    import_from: str | None = None
    """`memplan plan`: evaluate this DeepSpeed config JSON or accelerate config YAML (by
    content) instead of planning, beside memplan's own plan. `import=PATH` is accepted as
    this key (`import` is a Python keyword, so it cannot be the field's name)."""
