"""Anomaly-detection methods on residual features."""

from residual_core.methods.base import AnomalyMethod, CategoryTrainData, ImagePool, MethodError, ScoreOutput
from residual_core.methods.registry import (
    available_methods,
    create_method,
    method_preprocess,
    register_method,
)

__all__ = [
    "AnomalyMethod",
    "CategoryTrainData",
    "ImagePool",
    "MethodError",
    "ScoreOutput",
    "available_methods",
    "create_method",
    "method_preprocess",
    "register_method",
]
