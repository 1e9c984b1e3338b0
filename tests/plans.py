"""Hand-built plans for tests that must not depend on the planner's choices."""

from __future__ import annotations

from configs import CONFIG_DIR
from configs.schema import Config
from planner.plan import (
    ClusterSummary,
    LayerPlan,
    Layout,
    MemoryBreakdown,
    ModelSummary,
    Plan,
    SolverInfo,
    TimeEstimate,
    TrainSummary,
)

MODEL_PRESETS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
"""Every model preset (configs/model/*.yaml): tests that hold for any model run over all."""


def manual_plan(
    cfg: Config,
    layers: list[LayerPlan] | None = None,
    micro_batch_size: int | None = None,
    **layout: object,
) -> Plan:
    """A plan for cfg with the given layout fields (default: one rank, nothing offloaded).

    Memory and time fields are zero: these plans were not predicted, only laid out.
    """
    m = cfg.model
    dp = int(layout.get("dp", 1))
    micro = micro_batch_size or max(1, cfg.train.global_batch_size // dp)
    pp = int(layout.get("pp", 1))
    virtual = int(layout.get("virtual_stages", 1))
    stages = pp * virtual
    fields = {
        "dp": dp,
        "tp": 1,
        "pp": pp,
        "sp": 1,
        "zero_stage": 0,
        "micro_batch_size": micro,
        "num_microbatches": cfg.train.global_batch_size // (dp * micro),
        "pp_schedule": "none" if pp == 1 else "1f1b",
        "zero_backend": "fsdp2",
        "virtual_stages": virtual,
    }
    fields.update(layout)
    if layers is None:
        layers = [
            LayerPlan(
                index=i,
                stage=i * stages // m.num_layers,
                offload_fraction=0.0,
                recompute="none",
                recompute_fraction=0.0,
            )
            for i in range(m.num_layers)
        ]
    from framework.components.model import build_model, count_parameters

    return Plan(
        model=ModelSummary(
            name=m.name,
            num_params=count_parameters(build_model(m)),
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            ffn_size=m.ffn_size,
            vocab_size=m.vocab_size,
        ),
        train=TrainSummary(
            seq_len=cfg.train.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=micro,
            dtype="fp32",
        ),
        layout=Layout(**fields),
        layers=tuple(layers),
        memory=MemoryBreakdown(0, 0, 0, 0, 0, 0, 0, 0),
        time=TimeEstimate(0.0, 0.0, 0.0),
        solver=SolverInfo("manual", "given", 0.0, 0),
        cluster=ClusterSummary(
            cfg.cluster.name,
            cfg.cluster.num_nodes,
            cfg.cluster.gpus_per_node,
            cfg.cluster.gpu_memory_gib,
        ),
    )
