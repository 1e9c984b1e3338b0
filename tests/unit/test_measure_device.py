"""framework/measure/device.py on the CPU: an emulated budget, the fp32 peak, a one-device
cluster the planner composes, and the environment line every benchmark prints."""

import pytest
import torch

from framework.measure.device import (
    CPU_PEAK_TFLOPS,
    available_host_bytes,
    cluster_overrides,
    describe_device,
    environment,
    environment_line,
    resolve_device,
)
from launch.compose import compose_config
from planner.units import GIB

CPU = torch.device("cpu")


def test_describe_device_on_the_cpu_is_the_emulated_budget():
    info = describe_device(CPU, 48 * 2**20, None)
    assert info.device == CPU and info.emulated
    assert info.memory_bytes == 48 * 2**20
    assert info.peak_tflops == CPU_PEAK_TFLOPS and info.hbm_gbps is None
    assert info.name.startswith("cpu (") and info.name.endswith(" cores)")
    assert 0 < info.host_bytes <= 2**50
    assert describe_device(CPU, 1, 2.5).peak_tflops == 2.5


def test_available_host_bytes_is_positive_and_at_most_physical_memory():
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_host_bytes() <= physical


def test_cluster_overrides_compose_into_a_cluster_that_is_this_device():
    info = describe_device(CPU, 64 * 2**20, None)
    overrides = cluster_overrides(info)
    assert overrides[0] == "cluster=cpu" and "planner.offload=on" in overrides
    cfg = compose_config(overrides)
    assert cfg.cluster.gpu_memory_gib == pytest.approx(64 * 2**20 / GIB, rel=1e-3)
    assert cfg.cluster.peak_tflops == CPU_PEAK_TFLOPS
    assert cfg.planner.fragmentation_reserve_fraction == 0


def test_environment_names_the_device_and_says_memory_is_emulated():
    info = describe_device(CPU, GIB, None)
    env = environment(info)
    assert env["device_type"] == "cpu" and env["memory_emulated"] is True
    assert env["device_memory_bytes"] == GIB and env["torch"] == torch.__version__
    line = environment_line(env)
    assert line.startswith(info.name + " | memory 1.00 GiB (emulated budget")
    assert f"torch {torch.__version__}" in line


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
