"""Training plans, data modules and pretraining corpora (Lightning)."""

from ._contrastive import info_nce
from ._corpus import CorpusPart, PretrainingCorpus
from ._datamodule import LengthBucketBatchSampler, PretrainingDataModule, PretrainingDataset
from ._finetune import (
    FinetuningDataset,
    FinetuningTrainingPlan,
    finetune_plan,
    freeze_for_finetuning,
    run_finetuning,
)
from ._gene_bias import expected_masked_values
from ._plan import XTrimoGeneTrainingPlan
from ._pretrain import build_corpus, run_pretraining
from ._settings import PretrainingObjective, TrainingResult, TrainingSettings
from ._source_corpus import part_from_source

__all__ = [
    "CorpusPart",
    "FinetuningDataset",
    "FinetuningTrainingPlan",
    "LengthBucketBatchSampler",
    "PretrainingCorpus",
    "PretrainingDataModule",
    "PretrainingDataset",
    "PretrainingObjective",
    "TrainingResult",
    "TrainingSettings",
    "XTrimoGeneTrainingPlan",
    "build_corpus",
    "expected_masked_values",
    "finetune_plan",
    "freeze_for_finetuning",
    "info_nce",
    "part_from_source",
    "run_finetuning",
    "run_pretraining",
]
