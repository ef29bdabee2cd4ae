"""Training plans and data modules (Lightning)."""

from ._datamodule import LengthBucketBatchSampler, PretrainingDataModule, PretrainingDataset
from ._finetune import (
    FinetuningDataset,
    FinetuningTrainingPlan,
    finetune_plan,
    freeze_for_finetuning,
)
from ._gene_bias import expected_masked_values
from ._plan import XTrimoGeneTrainingPlan

__all__ = [
    "FinetuningDataset",
    "FinetuningTrainingPlan",
    "LengthBucketBatchSampler",
    "PretrainingDataModule",
    "PretrainingDataset",
    "XTrimoGeneTrainingPlan",
    "expected_masked_values",
    "finetune_plan",
    "freeze_for_finetuning",
]
