"""plan.plot=PATH: a PNG of a plan's per-GPU memory breakdown and per-layer policies.

Left: one stacked bar per pipeline rank (params, grads, optimizer, activations, other)
against the GPU budget. Right: per layer, the token fractions kept on the device,
offloaded to the host and recomputed (full recompute counts as all recomputed; the anchor
offload fraction is drawn as a line). matplotlib is imported only here, with the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from planner.plan import Plan
from planner.units import GIB

PARTS = (
    ("params", "#4c72b0"),
    ("grads", "#55a868"),
    ("optimizer", "#c44e52"),
    ("activations", "#dd8452"),
    ("other", "#8172b3"),
)


def write_plot(plan: Plan, path: str | Path) -> None:
    """Write the chart as a PNG (parent directories are created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig, (mem_ax, layer_ax) = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2.4]}
    )
    ranks = plan.ranks
    labels = [f"pp{r.pp_rank}" for r in ranks]
    bottoms = [0.0] * len(ranks)
    for name, color in PARTS:
        if name == "other":
            values = [r.other_bytes / GIB for r in ranks]
        else:
            values = [getattr(r, f"{name}_bytes") / GIB for r in ranks]
        mem_ax.bar(labels, values, bottom=bottoms, color=color, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    budget = plan.memory.gpu_budget_bytes / GIB
    mem_ax.axhline(budget, color="black", linestyle="--", label=f"budget {budget:.1f} GiB")
    mem_ax.set_ylabel("GiB per GPU")
    mem_ax.set_title("memory per GPU")
    mem_ax.legend(fontsize=8, loc="lower right")

    index = [layer.index for layer in plan.layers]
    full = [1.0 if layer.recompute == "full" else 0.0 for layer in plan.layers]
    offload = [layer.offload_fraction for layer in plan.layers]
    recompute = [f or layer.recompute_fraction for f, layer in zip(full, plan.layers, strict=True)]
    kept = [1.0 - o - r for o, r in zip(offload, recompute, strict=True)]
    layer_ax.bar(index, kept, color="#4c72b0", label="kept on GPU", width=1.0)
    layer_ax.bar(index, offload, bottom=kept, color="#dd8452", label="offloaded", width=1.0)
    tops = [k + o for k, o in zip(kept, offload, strict=True)]
    layer_ax.bar(index, recompute, bottom=tops, color="#c44e52", label="recomputed", width=1.0)
    anchors = [layer.anchor_offload_fraction for layer in plan.layers]
    layer_ax.plot(index, anchors, color="black", marker=".", label="anchors offloaded")
    for boundary in range(1, len(plan.layers)):
        if plan.layers[boundary].stage != plan.layers[boundary - 1].stage:
            layer_ax.axvline(boundary - 0.5, color="grey", linewidth=0.8)
    layer_ax.set_xlabel("layer (grey lines: pipeline stage boundaries)")
    layer_ax.set_ylabel("fraction of tokens")
    layer_ax.set_ylim(0, 1.05)
    layer_ax.set_title("per-layer activation policy (token-local tensors)")
    layer_ax.legend(fontsize=8, loc="lower right")
    lay = plan.layout
    fig.suptitle(
        f"{plan.model.name}  seq {plan.train.seq_len}  dp{lay.dp} tp{lay.tp} pp{lay.pp} "
        f"sp{lay.sp} ZeRO-{lay.zero_stage}  MFU {100 * plan.time.mfu:.1f}%"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
