"""The config tree's root: one field per section, each section's dataclass in the module of
its subject (model.py, data.py, training.py, objective.py). Every default lives in those
dataclasses; ranges are checked after a merge (`rules.py`), choices are `Literal` types."""

from __future__ import annotations

from dataclasses import dataclass, field

from setdiv.config.data import DataConfig
from setdiv.config.model import ModelConfig, SimilarityConfig
from setdiv.config.objective import LossConfig
from setdiv.config.training import OptimConfig, TrainConfig

__all__ = ["Config"]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
