"""The device a measurement runs on, as the planner should see it, and where the numbers were
taken.

    info = describe_device(resolve_device("auto"), budget_bytes, peak_tflops)
    cluster_overrides(info)   # config overrides of a one-device cluster that is this device
    environment(info)         # what goes into every benchmark JSON

On CUDA: the GPU's total memory and, from its name, its dense bf16 peak and HBM bandwidth.
On the CPU the device memory is an emulated budget (measured peaks are checked against it,
not enforced) and the peak is fp32 (configs/cluster/cpu.yaml).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner.units import GIB

DEVICE_SPECS = {
    # name fragment: (dense bf16 TFLOP/s, HBM GB/s) from the datasheets (SXM parts)
    "H200": (989.0, 4800.0),
    "H100": (989.0, 3350.0),
    "A100": (312.0, 2039.0),
}
CPU_PEAK_TFLOPS = 0.16
"""configs/cluster/cpu.yaml: 2 cores x AVX2 FMA fp32."""


@dataclass(frozen=True)
class DeviceInfo:
    """The device a measurement runs on, as the planner should see it."""

    device: torch.device
    name: str
    memory_bytes: int
    """CUDA: the GPU's total memory. CPU: the emulated device budget (--budget-bytes)."""
    host_bytes: int
    """Host RAM available at start (MemAvailable)."""
    peak_tflops: float
    """Dense peak in the training dtype (bf16 on CUDA, fp32 on the CPU)."""
    hbm_gbps: float | None
    emulated: bool
    """True on the CPU: memory limits are checked against measured peaks, not enforced."""


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (total physical memory where that is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is one, else the CPU. ValueError for cuda without one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def describe_device(
    device: torch.device, budget_bytes: int, peak_tflops: float | None
) -> DeviceInfo:
    """What the planner is told about this device (see cluster_overrides). ValueError for a
    GPU of unknown peak when peak_tflops is not given."""
    host = available_host_bytes()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        spec = next((v for k, v in DEVICE_SPECS.items() if k in props.name), None)
        if peak_tflops is None and spec is None:
            raise ValueError(f"unknown GPU {props.name!r}: pass --peak-tflops (dense bf16)")
        return DeviceInfo(
            device=device,
            name=props.name,
            memory_bytes=props.total_memory,
            host_bytes=host,
            peak_tflops=peak_tflops or spec[0],
            hbm_gbps=spec[1] if spec else None,
            emulated=False,
        )
    return DeviceInfo(
        device=device,
        name=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        memory_bytes=budget_bytes,
        host_bytes=host,
        peak_tflops=peak_tflops or CPU_PEAK_TFLOPS,
        hbm_gbps=None,
        emulated=True,
    )


def cluster_overrides(info: DeviceInfo) -> list[str]:
    """Config overrides of a one-device cluster that is this device. On the CPU the device
    is the emulated budget, activation offload is switched on (planner.offload=on), so the
    plan uses the same tools as on a GPU, and no allocator reserve is kept."""
    host_gib = info.host_bytes / GIB
    if info.device.type == "cuda":
        overrides = [
            "cluster=h100_1x",
            f"cluster.gpu_memory_gib={info.memory_bytes / GIB:.3f}",
            f"cluster.host_memory_gib={host_gib:.3f}",
            f"cluster.peak_tflops={info.peak_tflops}",
        ]
        if info.hbm_gbps:
            overrides.append(f"cluster.hbm_bandwidth_gbps={info.hbm_gbps}")
        return overrides
    return [
        "cluster=cpu",
        f"cluster.gpu_memory_gib={info.memory_bytes / GIB:.6f}",
        f"cluster.host_memory_gib={host_gib:.3f}",
        f"cluster.peak_tflops={info.peak_tflops}",
        "planner.offload=on",
        # LiveBytes counts exact allocations: there is no caching allocator to fragment, so
        # the plan gets the same budget the measured baselines are held to
        "planner.fragmentation_reserve_fraction=0",
    ]


def environment(info: DeviceInfo) -> dict[str, Any]:
    """Where and when the numbers were taken (goes into every JSON)."""
    return {
        "device": info.name,
        "device_type": info.device.type,
        "device_memory_bytes": info.memory_bytes,
        "memory_emulated": info.emulated,
        "host_available_bytes": info.host_bytes,
        "peak_tflops": info.peak_tflops,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }


def environment_line(env: dict[str, Any]) -> str:
    """One line of `environment`'s facts for the top of a benchmark's output."""
    memory = f"{env['device_memory_bytes'] / GIB:.2f} GiB"
    if env["memory_emulated"]:
        memory += " (emulated budget: measured peaks are checked against it)"
    return (
        f"{env['device']} | memory {memory} | host available "
        f"{env['host_available_bytes'] / GIB:.1f} GiB | torch {env['torch']} | "
        f"{env['cpu_count']} CPUs, load average {env['load_average']:.1f}"
    )
