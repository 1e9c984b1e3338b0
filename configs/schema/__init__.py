"""Typed schemas of every config node. `Config` is the root that Hydra composes into."""

from dataclasses import dataclass, field

from configs.schema.checkpoint import CheckpointConfig
from configs.schema.cluster import ClusterConfig
from configs.schema.export import ExportConfig
from configs.schema.io import PlanIOConfig
from configs.schema.launch import JobConfig, LaunchConfig
from configs.schema.logging import LoggingConfig
from configs.schema.model import ModelConfig
from configs.schema.planner import PlannerConfig
from configs.schema.prepare import PrepareConfig
from configs.schema.profile import ProfileConfig
from configs.schema.train import DataConfig, TrainConfig


@dataclass(frozen=True)
class Config:
    """The whole run. Components receive their own sub-config, never this root."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (group: model)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The hardware (group: cluster)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation (group: train)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token source."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """Plan search (group: planner)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing (group: checkpoint)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and tracking (group: logging)."""
    plan: PlanIOConfig = field(default_factory=PlanIOConfig)
    """Plan files."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """`memplan profile`."""
    job: JobConfig = field(default_factory=JobConfig)
    """`memplan job`."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """`memplan train` process launch."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """`memplan export`."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """`memplan data`."""


__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "ExportConfig",
    "JobConfig",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "PlanIOConfig",
    "PlannerConfig",
    "PrepareConfig",
    "ProfileConfig",
    "TrainConfig",
]
