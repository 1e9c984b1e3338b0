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
