"""Retrieval evaluation: SYSU-MM01 and RegDB protocols, metrics, re-ranking, reports."""

from .metrics import PROTOCOLS, RetrievalResult, evaluate

__all__ = ["PROTOCOLS", "RetrievalResult", "evaluate"]
