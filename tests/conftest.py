"""Shared fixtures. Tests never touch the network: wandb runs offline."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def tiny_config():
    """The demo config (tiny model on cluster=cpu) with wandb off."""
    from launch.compose import compose_config

    return compose_config(["logging.wandb=false"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast, and far faster on a loaded machine
    (2 threads per process on 2 shared cores spin against each other). Use per module:
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
