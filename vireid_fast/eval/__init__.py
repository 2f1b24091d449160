"""Retrieval evaluation: SYSU-MM01 and RegDB protocols, metrics, re-ranking, reports."""

from .metrics import PROTOCOLS, RetrievalResult, evaluate
from .regdb import RegDBSplit, regdb_list, regdb_split
from .report import format_table, plot_cmc, results_to_json
from .rerank import kreciprocal
from .sysu import sysu_gallery, sysu_query, sysu_test_ids
from .trials import TrialSummary, cosine_distance, evaluate_trials, summarize_trials

__all__ = [
    "PROTOCOLS", "RegDBSplit", "RetrievalResult", "TrialSummary", "cosine_distance", "evaluate", "evaluate_trials",
    "format_table", "kreciprocal", "plot_cmc", "regdb_list", "regdb_split", "results_to_json", "summarize_trials",
    "sysu_gallery", "sysu_query", "sysu_test_ids",
]
