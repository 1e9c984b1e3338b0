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

    def __post_init__(self) -> None:
        check_bounds(self, "cluster", ("num_nodes", "gpus_per_node"), at_least=1)
        memories = ("gpu_memory_gib", "host_memory_gib")
        rates = ("peak_tflops", "hbm_bandwidth_gbps", "host_to_device_gbps")
        links = ("intra_node_gbps", "inter_node_gbps")
        check_bounds(self, "cluster", (*memories, *rates, *links), above=0)

    @property
    def world_size(self) -> int:
        """Total number of accelerators (worker processes)."""
        return self.num_nodes * self.gpus_per_node
