"""Schema of the `planner` group: how the MILP searches and what the cost model assumes."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds
from configs.errors import ConfigError

PIPELINE_SCHEDULES = (
    "gpipe",
    "1f1b",
    "interleaved_1f1b",
    "interleaved_zero_bubble",
    "zbv_zero_bubble",
)
"""Schedules a pipelined layout (pp > 1) may use; pp = 1 always runs without one."""


@dataclass(frozen=True)
class PlannerConfig:
    """Solver limits, the layout search space and the cost model's hardware constants."""

    solver: Literal["auto", "highs", "cbc"] = "auto"
    """MILP solver: auto = HiGHS when highspy is installed, CBC otherwise."""
    time_limit_seconds: float = 10.0
    """Wall-time bound of the whole plan search."""
    solve_time_limit_seconds: float = 0.5
    """Wall-time bound of one layout's MILP solve; the best solution found by then counts."""
    mip_gap: float = 0.01
    """Relative optimality gap at which a solve stops."""

    # --- layout search space -------------------------------------------------------------
    dp: int | None = None
    """Pin the data-parallel degree; None searches it."""
    tp: int | None = None
    """Pin the tensor-parallel degree; None searches it."""
    pp: int | None = None
    """Pin the pipeline-parallel degree; None searches it."""
    sp: int | None = None
    """Pin the (Ulysses) sequence-parallel degree; None searches it."""
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    """ZeRO stages the search may pick from (0 = plain data parallelism)."""
    pp_schedules: tuple[str, ...] = PIPELINE_SCHEDULES
    """Pipeline schedules the search may pick from when pp > 1."""
    max_virtual_stages: int = 4
    """Most pipeline stages per pp rank for interleaved schedules (ZB-V always uses 2)."""
    max_micro_batch_size: int = 16
    """Largest micro-batch the search tries when train.micro_batch_size is null."""
    zero_backend: Literal["auto", "fsdp2", "deepspeed"] = "auto"
    """ZeRO implementation: auto prefers fsdp2; deepspeed only runs layouts with tp=pp=sp=1."""
    offload: Literal["auto", "on", "off"] = "auto"
    """Activation offload to host RAM: auto = on for cuda clusters, off for cpu (where the
    host and the "device" are the same memory)."""
    state_offload: Literal["auto", "on", "off"] = "auto"
    """Whether the search may keep model states (sharded parameters, gradients, optimizer
    state) in host RAM with the optimizer step on the CPU (FSDP2 ZeRO-2/3): auto = on for
    cuda clusters, off for cpu. The plan offloads only where that is faster than every plan
    without it, i.e. where nothing else fits."""

    # --- time model ----------------------------------------------------------------------
    matmul_efficiency: float = 0.7
    """Achievable fraction of cluster.peak_tflops in the dense matmuls (projections, MLP,
    output layer)."""
    attention_efficiency: float = 0.55
    """Achievable fraction of cluster.peak_tflops in the attention core (FlashAttention
    forward and backward)."""
    memory_bandwidth_efficiency: float = 0.8
    """Achievable fraction of cluster.hbm_bandwidth_gbps in element-wise ops (norms, RoPE,
    SwiGLU, residuals, the optimizer step)."""
    network_efficiency: float = 0.8
    """Achievable fraction of the intra/inter-node bus bandwidth in collectives and p2p."""
    host_transfer_efficiency: float = 0.9
    """Achievable fraction of cluster.host_to_device_gbps for activation offload copies."""
    layer_overhead_seconds: float = 2e-5
    """Fixed cost (kernel launches, Python) of one layer's forward or backward pass."""
    collective_latency_seconds: float = 3e-5
    """Fixed cost of one collective or point-to-point transfer (launch and synchronisation),
    on top of its bytes / bandwidth."""

    # --- memory model --------------------------------------------------------------------
    fragmentation_reserve_fraction: float = 0.05
    """Fraction of each GPU's memory kept free for allocator fragmentation, assuming the CUDA
    allocator's expandable segments (the runtime sets PYTORCH_CUDA_ALLOC_CONF to
    expandable_segments:True unless the user set it: framework/components/device.py)."""
    cuda_context_gib: float = 0.75
    """CUDA context and library workspaces per GPU (ignored for cluster.device=cpu)."""
    host_reserve_fraction: float = 0.1
    """Fraction of each node's host RAM kept for the OS, data loading and the runtime."""

    def __post_init__(self) -> None:
        time_limits = ("time_limit_seconds", "solve_time_limit_seconds")
        check_bounds(self, "planner", time_limits, above=0)
        check_bounds(self, "planner", ("mip_gap",), at_least=0, below=1)
        check_bounds(self, "planner", ("dp", "tp", "pp", "sp"), at_least=1)  # null: searched
        if not self.zero_stages or any(s not in (0, 1, 2, 3) for s in self.zero_stages):
            raise ConfigError(
                "planner.zero_stages",
                f"got {list(self.zero_stages)}; allowed: a non-empty list of 0, 1, 2, 3",
            )
        bad = [s for s in self.pp_schedules if s not in PIPELINE_SCHEDULES]
        if bad or not self.pp_schedules:
            raise ConfigError(
                "planner.pp_schedules",
                f"got {list(self.pp_schedules)}; allowed: a non-empty list of "
                + ", ".join(PIPELINE_SCHEDULES),
            )
        search_limits = ("max_virtual_stages", "max_micro_batch_size")
        check_bounds(self, "planner", search_limits, at_least=1)
        compute = ("matmul_efficiency", "attention_efficiency", "memory_bandwidth_efficiency")
        transfers = ("network_efficiency", "host_transfer_efficiency")
        check_bounds(self, "planner", (*compute, *transfers), above=0, at_most=1)
        costs = ("layer_overhead_seconds", "collective_latency_seconds", "cuda_context_gib")
        check_bounds(self, "planner", costs, at_least=0)
        reserves = ("fragmentation_reserve_fraction", "host_reserve_fraction")
        check_bounds(self, "planner", reserves, at_least=0, below=1)
