"""Training plans and data modules (Lightning)."""

from ._datamodule import LengthBucketBatchSampler, PretrainingDataModule, PretrainingDataset
from ._plan import XTrimoGeneTrainingPlan

__all__ = [
    "LengthBucketBatchSampler",
    "PretrainingDataModule",
    "PretrainingDataset",
    "XTrimoGeneTrainingPlan",
]
