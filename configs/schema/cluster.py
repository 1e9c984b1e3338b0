"""Schema of the `cluster` group: the hardware the plan is made for."""

from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError


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
        for key in ("num_nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cluster.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in (
            "gpu_memory_gib",
            "host_memory_gib",
            "peak_tflops",
            "hbm_bandwidth_gbps",
            "host_to_device_gbps",
            "intra_node_gbps",
            "inter_node_gbps",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cluster.{key}", f"must be > 0, got {getattr(self, key)}")

    @property
    def world_size(self) -> int:
        """Total number of accelerators (worker processes)."""
        return self.num_nodes * self.gpus_per_node
