"""plan.plot=PATH: a PNG of a plan's per-GPU memory breakdown and per-layer policies.

Left: one stacked bar per pipeline rank (params, the gradients live at the peak, optimizer,
activations, other) against the GPU budget. Right: per layer, the token fractions of the
token-local tensors kept on the device, offloaded to the host and recomputed (full
recomputation counts as all recomputed), the anchor offload fraction as a line, and a strip
above the bars with each layer's recompute mode (selective, full). Both legends sit below
their axes, so they never cover a bar; rank labels thin out past 16 ranks. matplotlib is
imported only here, with the Agg backend.
"""

from __future__ import annotations

import math
from pathlib import Path

from planner.plan import LayerPlan, Plan
from planner.units import GIB

PARTS = (
    ("params", "#4c72b0"),
    ("grads", "#55a868"),
    ("optimizer", "#c44e52"),
    ("activations", "#dd8452"),
    ("other", "#8172b3"),
)
KEPT, OFFLOADED, RECOMPUTED = "#4c72b0", "#dd8452", "#c44e52"
MODES = {"selective": ("#8172b3", "selective (cheap ops recomputed, all tokens)"),
         "full": ("#2f2f2f", "full (whole layer recomputed)")}  # fmt: skip
MAX_RANK_LABELS = 16
"""More pipeline ranks than this: only every k-th is labelled, so labels never run together."""
STRIP = (1.04, 1.11)
"""Where the recompute-mode strip sits, in fraction-of-tokens units (above the bars)."""


def rank_ticks(num_ranks: int) -> tuple[list[int], list[str]]:
    """Positions and labels of the pipeline ranks on the x axis: all of them up to
    MAX_RANK_LABELS, else every k-th (and the last)."""
    step = max(1, math.ceil(num_ranks / MAX_RANK_LABELS))
    shown = list(range(0, num_ranks, step))
    if shown and shown[-1] != num_ranks - 1:
        shown.append(num_ranks - 1)
    return shown, [str(rank) for rank in shown]


def layer_fractions(layers: list[LayerPlan]) -> tuple[list[float], list[float], list[float]]:
    """(kept, offloaded, recomputed) token fractions per layer; a full layer is all
    recomputed."""
    offloaded = [0.0 if layer.recompute == "full" else layer.offload_fraction for layer in layers]
    recomputed = [
        1.0 if layer.recompute == "full" else layer.recompute_fraction for layer in layers
    ]
    kept = [max(0.0, 1.0 - o - r) for o, r in zip(offloaded, recomputed, strict=True)]
    return kept, offloaded, recomputed


def _memory_panel(ax, plan: Plan) -> None:
    ranks = plan.ranks
    positions = list(range(len(ranks)))
    bottoms = [0.0] * len(ranks)
    for name, color in PARTS:
        if name == "other":
            values = [r.other_bytes / GIB for r in ranks]
        elif name == "grads":  # those produced by the peak: the bar tops at the rank's peak
            values = [(r.grads_bytes - r.grads_pending_bytes) / GIB for r in ranks]
        else:
            values = [getattr(r, f"{name}_bytes") / GIB for r in ranks]
        width = 0.8 if len(ranks) > 1 else 0.4
        ax.bar(positions, values, bottom=bottoms, color=color, label=name, width=width)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    budget = plan.memory.gpu_budget_bytes / GIB
    ax.axhline(budget, color="black", linestyle="--", label=f"budget {budget:.3g} GiB")
    ax.set_ylim(0, 1.08 * max([budget, *bottoms]) or 1.0)  # or: a plan without predictions
    ticks, labels = rank_ticks(len(ranks))
    ax.set_xticks(ticks, labels)
    ax.set_xlim(-0.6, len(ranks) - 0.4)
    ax.set_xlabel("pipeline rank" if len(ranks) > 1 else "pipeline rank (no pipeline)")
    ax.set_ylabel("GiB per GPU at its peak")
    ax.set_title("memory per GPU")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)


def _layer_panel(ax, plan: Plan) -> None:
    from matplotlib.patches import Patch, Rectangle

    layers = list(plan.layers)
    index = [layer.index for layer in layers]
    kept, offloaded, recomputed = layer_fractions(layers)
    ax.bar(index, kept, color=KEPT, label="kept on GPU", width=1.0)
    ax.bar(index, offloaded, bottom=kept, color=OFFLOADED, label="offloaded", width=1.0)
    tops = [k + o for k, o in zip(kept, offloaded, strict=True)]
    ax.bar(index, recomputed, bottom=tops, color=RECOMPUTED, label="recomputed", width=1.0)
    anchors = [layer.anchor_offload_fraction for layer in layers]
    ax.plot(index, anchors, color="black", marker="." if len(layers) <= 64 else None,
            linewidth=1.2, label="anchors offloaded")  # fmt: skip
    low, high = STRIP
    ax.add_patch(Rectangle((index[0] - 0.5, low), len(layers), high - low, fill=False,
                           edgecolor="grey", linewidth=0.6))  # fmt: skip
    used = set()
    for layer in layers:
        if layer.recompute in MODES:
            color = MODES[layer.recompute][0]
            ax.add_patch(Rectangle((layer.index - 0.5, low), 1.0, high - low, color=color))
            used.add(layer.recompute)
    ax.text(index[0] - 0.5, high + 0.01, "recompute mode", fontsize=8, va="bottom")
    for boundary in range(1, len(layers)):
        if layers[boundary].stage != layers[boundary - 1].stage:
            ax.axvline(boundary - 0.5, color="grey", linewidth=0.6, ymax=1.0 / 1.2)
    ax.set_xlim(index[0] - 0.5, index[-1] + 0.5)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    stages = 1 + sum(
        layers[i].stage != layers[i - 1].stage for i in range(1, len(layers))
    )  # the grey lines
    where = f"; grey lines: boundaries of the {stages} pipeline stages" if stages > 1 else ""
    ax.set_xlabel(f"layer{where}")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("per-layer activation policy (token-local tensors)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=MODES[mode][0], label=MODES[mode][1]) for mode in MODES if mode in used]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=3, frameon=False)  # fmt: skip


def write_plot(plan: Plan, path: str | Path) -> None:
    """Write the chart as a PNG (parent directories are created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ranks = len(plan.ranks)
    fig, (mem_ax, layer_ax) = plt.subplots(
        1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1 + min(ranks, 32) / 32, 2.4]}
    )
    _memory_panel(mem_ax, plan)
    _layer_panel(layer_ax, plan)
    lay = plan.layout
    schedule = "" if lay.pp == 1 else f" {lay.pp_schedule}"
    fig.suptitle(
        f"{plan.model.name}  seq {plan.train.seq_len}  dp{lay.dp} tp{lay.tp} pp{lay.pp} "
        f"sp{lay.sp} ZeRO-{lay.zero_stage}{schedule}  MFU {100 * plan.time.mfu:.1f}%"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110, bbox_inches="tight")
    plt.close(fig)
