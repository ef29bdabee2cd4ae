"""Training plans, data modules and pretraining corpora (Lightning)."""

from ._adapt import AdaptationResult, AdaptationSpec, TokenCache, adapt_module, cache_frozen_layers
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
from ._lora import LoraSpec
from ._plan import XTrimoGeneTrainingPlan
from ._positives import PositivePairs, corpus_neighbours, expression_features, positive_pairs
from ._pretrain import build_corpus, run_pretraining
from ._settings import PretrainingObjective, TrainingResult, TrainingSettings
from ._source_corpus import part_from_source

__all__ = [
    "AdaptationResult",
    "AdaptationSpec",
    "CorpusPart",
    "FinetuningDataset",
    "FinetuningTrainingPlan",
    "LengthBucketBatchSampler",
    "LoraSpec",
    "PositivePairs",
    "PretrainingCorpus",
    "PretrainingDataModule",
    "PretrainingDataset",
    "PretrainingObjective",
    "TokenCache",
    "TrainingResult",
    "TrainingSettings",
    "XTrimoGeneTrainingPlan",
    "adapt_module",
    "build_corpus",
    "cache_frozen_layers",
    "corpus_neighbours",
    "expected_masked_values",
    "expression_features",
    "finetune_plan",
    "freeze_for_finetuning",
    "info_nce",
    "part_from_source",
    "positive_pairs",
    "run_finetuning",
    "run_pretraining",
]
