"""Schema of the `cluster` group: the hardware the plan is made for."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds


@dataclass(frozen=True)
class ClusterConfig:
    """Nodes, accelerators and the bandwidths the planner's time model uses.

    Bandwidths are in GB/s (1e9 bytes/s), memories in GiB (2**30 bytes).
    """

    name: str = "cpu"
    """Preset name; shown in plans."""
    device: Literal["cpu", "cuda"] = "cpu"
    """What each worker process computes on."""
    num_nodes: int = 1
    """Number of machines."""
    gpus_per_node: int = 1
    """Accelerators (worker processes) per machine."""
    gpu_memory_gib: float = 8.0
    """Memory of one accelerator (for cpu: the share of RAM one worker may use)."""
    host_memory_gib: float = 24.0
    """Host RAM per node available for offloaded activations and checkpoint staging."""
    peak_tflops: float = 0.16
    """Dense peak of one accelerator in the training dtype (bf16 on GPU, fp32 on CPU)."""
    hbm_bandwidth_gbps: float = 20.0
    """Device memory bandwidth."""
    host_to_device_gbps: float = 10.0
    """Host<->device copy bandwidth of one accelerator, each direction (PCIe)."""
    intra_node_gbps: float = 10.0
    """Collective bus bandwidth per accelerator inside a node (NVLink)."""
    inter_node_gbps: float = 1.0
    """Collective bus bandwidth per accelerator across nodes (InfiniBand/RoCE)."""
    host_adam_gparams_per_second: float = 0.6
    """AdamW throughput of one node's CPUs, in 1e9 parameters per second, shared by its
    accelerators' processes (the optimizer step of offloaded model states runs there).
    Default: torch's fused CPU AdamW on one core of this project's CI machine (fp32, 10.9M
    parameters in 16.5 ms: BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        check_bounds(self, "cluster", ("num_nodes", "gpus_per_node"), at_least=1)
        memories = ("gpu_memory_gib", "host_memory_gib")
        rates = ("peak_tflops", "hbm_bandwidth_gbps", "host_to_device_gbps")
        rates += ("host_adam_gparams_per_second",)
        links = ("intra_node_gbps", "inter_node_gbps")
        check_bounds(self, "cluster", (*memories, *rates, *links), above=0)

    @property
    def world_size(self) -> int:
        """Total number of accelerators (worker processes)."""
        return self.num_nodes * self.gpus_per_node
