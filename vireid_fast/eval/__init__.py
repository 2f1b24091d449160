"""Retrieval evaluation: SYSU-MM01 and RegDB protocols, metrics, re-ranking, reports."""
