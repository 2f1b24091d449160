"""Observability: pseudo-label quality (ARI, NMI against ground truth: reporting only, never used for training),
JSON-lines metrics, PNG curves, the results table."""

from __future__ import annotations

import json
import os

import numpy as np


def _contingency(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    pred = pred.copy()
    outliers = pred < 0
    # An outlier is its own singleton cluster (it is grouped with nothing).
    pred[outliers] = pred.max(initial=-1) + 1 + np.arange(int(outliers.sum()))
    _, t = np.unique(truth, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def adjusted_rand_index(truth, pred) -> float:
    """ARI of predicted clusters (-1 = outlier, each its own singleton) against true labels."""
    table = _contingency(np.asarray(truth), np.asarray(pred))
    n = table.sum()

    def comb2(x):
        return (x * (x - 1) / 2.0).sum()

    index = comb2(table)
    rows, cols = comb2(table.sum(1)), comb2(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2.0) if n > 1 else 0.0
    maximum = (rows + cols) / 2.0
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def normalized_mutual_info(truth, pred) -> float:
    """NMI (arithmetic-mean normalisation, as scikit-learn's default) with outliers as singletons."""
    table = _contingency(np.asarray(truth), np.asarray(pred)).astype(np.float64)
    n = table.sum()
    pt, pp = table.sum(1) / n, table.sum(0) / n
    nz = table > 0
    pij = table[nz] / n
    mi = float((pij * np.log(pij / np.outer(pt, pp)[nz])).sum())
    ht = float(-(pt[pt > 0] * np.log(pt[pt > 0])).sum())
    hp = float(-(pp[pp > 0] * np.log(pp[pp > 0])).sum())
    if ht == 0 and hp == 0:
        return 1.0
    denom = (ht + hp) / 2.0
    return float(mi / denom) if denom > 0 else 0.0


def cross_modality_pair_precision_recall(truth_v, labels_v, truth_r, labels_r) -> tuple[float, float]:
    """Pseudo-label quality across modalities, over (visible, infrared) image pairs.

    precision = pairs with the same pseudo-label that share the true identity / pairs with the same pseudo-label;
    recall = pairs with the same pseudo-label that share the true identity / pairs that share the true identity.
    Outliers (label < 0) share no label with anything. Counted from per-(label, identity) histograms, O(N) memory
    (no N_v x N_r matrix); NaN where the denominator is 0. Only meaningful when the two modalities' labels index
    one label space (after cross-modality association).
    """
    truth_v, labels_v = np.asarray(truth_v, dtype=np.int64), np.asarray(labels_v, dtype=np.int64)
    truth_r, labels_r = np.asarray(truth_r, dtype=np.int64), np.asarray(labels_r, dtype=np.int64)
    ids = np.unique(np.concatenate([truth_v, truth_r]))
    tv, tr = np.searchsorted(ids, truth_v), np.searchsorted(ids, truth_r)
    same_identity = float(np.dot(np.bincount(tv, minlength=ids.size), np.bincount(tr, minlength=ids.size)))
    kv, kr = labels_v >= 0, labels_r >= 0
    size = int(max(labels_v.max(initial=-1), labels_r.max(initial=-1))) + 1
    same_label = float(np.dot(np.bincount(labels_v[kv], minlength=size), np.bincount(labels_r[kr], minlength=size)))
    joint_v = np.bincount(labels_v[kv] * ids.size + tv[kv], minlength=size * ids.size)
    joint_r = np.bincount(labels_r[kr] * ids.size + tr[kr], minlength=size * ids.size)
    both = float(np.dot(joint_v, joint_r))
    precision = both / same_label if same_label else float("nan")
    recall = both / same_identity if same_identity else float("nan")
    return precision, recall


class MetricsLog:
    """Appends one JSON object per line to ``path`` and keeps the rows for plots."""

    def __init__(self, path: str, rows: list[dict] | None = None):
        self.path = path
        self.rows = list(rows or [])

    def append(self, row: dict) -> None:
        self.rows.append(row)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def rewrite(self) -> None:
        """Rewrite the file from ``rows`` (after a resume, so it never holds epochs the checkpoint does not)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")


CURVE_GROUPS = (
    ("losses", "loss/"),
    ("clusters and outliers", ("clusters/", "outliers/")),
    ("pseudo-label quality (vs ground truth)", ("ari/", "nmi/")),
    ("retrieval (%)", ("rank1", "mAP", "mINP")),
    ("seconds per epoch", "time/"),
)


def plot_curves(rows: list[dict], path: str) -> str | None:
    """One PNG with a panel per group of metrics over epochs; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(CURVE_GROUPS), figsize=(4.2 * len(CURVE_GROUPS), 3.4))
    for ax, (title, prefixes) in zip(axes, CURVE_GROUPS, strict=True):
        prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
        keys = sorted({k for r in rows for k in r if k.startswith(prefixes) and isinstance(r[k], (int, float))})
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def results_table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'model':<24}{'Rank-1':>9}{'Rank-10':>9}{'mAP':>9}{'mINP':>9}", "-" * 60]
    for name, r in rows:
        lines.append(f"{name:<24}{r['rank1']:>9.2f}{r.get('rank10', float('nan')):>9.2f}{r['mAP']:>9.2f}"
                     f"{r['mINP']:>9.2f}")
    return "\n".join(lines)
