"""Synthesis of transfer inputs from teachers' BatchNorm statistics (data-free distillation)."""

from generators.deepinversion import DeepInversion, InversionConfig
from generators.hooks import (
    BatchNormStatistics,
    RunningStatistics,
    StatisticsTargets,
    SuppliedStatistics,
    bn_statistics,
    check_statistics,
    normalization_layers,
)
from generators.losses import (
    competition_loss,
    feature_matching_loss,
    jensen_shannon,
    l2_prior,
    total_variation,
)

__all__ = [
    "BatchNormStatistics",
    "DeepInversion",
    "InversionConfig",
    "RunningStatistics",
    "StatisticsTargets",
    "SuppliedStatistics",
    "normalization_layers",
    "bn_statistics",
    "check_statistics",
    "competition_loss",
    "feature_matching_loss",
    "jensen_shannon",
    "l2_prior",
    "total_variation",
]
