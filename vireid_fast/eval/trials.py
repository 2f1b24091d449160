"""Several trials (10 SYSU-MM01 gallery draws, or 10 RegDB splits) evaluated and summarised as mean ± std."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import RetrievalResult, evaluate

__all__ = ["METRICS", "TrialSummary", "cosine_distance", "evaluate_trials", "summarize_trials"]

METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


@dataclass
class TrialSummary:
    """Per-trial results and their mean and standard deviation (population std, ddof=0) for :data:`METRICS`.

    ``mean_cmc`` is the mean of the reported curves (de-duplicated CMC for SYSU, standard CMC for RegDB).
    """

    results: list[RetrievalResult]
    mean: dict[str, float]
    std: dict[str, float]
    mean_cmc: np.ndarray
    label: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"label": self.label, "num_trials": len(self.results), "mean": self.mean, "std": self.std,
                "mean_cmc": self.mean_cmc.tolist(), "trials": [r.to_dict() for r in self.results], **self.meta}


def summarize_trials(results: Sequence[RetrievalResult], label: str = "") -> TrialSummary:
    """Mean and std over trials of Rank-1/5/10/20, mAP and mINP (NaN ranks beyond a short gallery are ignored)."""
    if not results:
        raise ValueError("results is empty; pass at least one RetrievalResult")
    table = np.array([[r.summary()[m] for m in METRICS] for r in results], dtype=np.float64)
    with warnings.catch_warnings():  # an all-NaN column (rank beyond every gallery) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(table, axis=0)
        std = np.nanstd(table, axis=0)
    length = min(len(r.reported_cmc) for r in results)
    mean_cmc = np.mean([r.reported_cmc[:length] for r in results], axis=0)
    mean_d = {m: float(v) for m, v in zip(METRICS, mean, strict=True)}
    std_d = {m: float(v) for m, v in zip(METRICS, std, strict=True)}
    return TrialSummary(list(results), mean_d, std_d, mean_cmc, label)


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``-(q · gᵀ)`` as in the community test code: (Nq, d), (Ng, d) L2-normalised features -> (Nq, Ng)."""
    return -(query @ gallery.T)


def evaluate_trials(trials: Iterable, *, protocol: str = "sysu", max_rank: int = 20, label: str = "") -> TrialSummary:
    """Evaluate each trial and summarise.

    Args:
        trials: iterable of per-trial inputs of :func:`evaluate`, each a tuple
            ``(distmat, q_pids, g_pids[, q_camids, g_camids])`` or a mapping with those keys.
        protocol, max_rank: as :func:`evaluate`.
    Returns:
        :class:`TrialSummary` (``.results`` holds each trial's :class:`RetrievalResult`).
    """
    results = []
    for i, trial in enumerate(trials):
        if isinstance(trial, Mapping):
            args = [trial["distmat"], trial["q_pids"], trial["g_pids"], trial.get("q_camids"), trial.get("g_camids")]
        elif isinstance(trial, (tuple, list)) and len(trial) in (3, 5):
            args = list(trial) + [None] * (5 - len(trial))
        else:
            raise TypeError(f"trial {i} must be a (distmat, q_pids, g_pids[, q_camids, g_camids]) tuple or a mapping")
        results.append(evaluate(*args, protocol=protocol, max_rank=max_rank))
    return summarize_trials(results, label)
