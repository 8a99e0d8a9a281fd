"""The offline demo: a synthetic image world with ground truth and a small CLIP backbone trained on it."""

from pathlib import Path

from ml.demo.world import (
                           GROUPS,
                           Concept,
                           Split,
                           WorldConfig,
                           concept_vocabulary,
                           default_config,
                           generate_split,
                           generate_world,
                           pretrain_config,
                           write_world,
)
from ml.demo.writer import sample_grid, world_metadata

CHECKPOINT_DIR = Path(__file__).with_name("checkpoint")

__all__ = ["CHECKPOINT_DIR", "GROUPS", "Concept", "Split", "WorldConfig", "concept_vocabulary", "default_config",
           "generate_split", "generate_world", "pretrain_config", "sample_grid", "world_metadata", "write_world"]
