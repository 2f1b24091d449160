"""Reports: a plain-text results table, JSON, and a CMC curve plot (PNG, matplotlib's Agg canvas).

Rows of a table are ``(label, result)`` pairs where ``result`` is a :class:`RetrievalResult` (one trial) or a
:class:`TrialSummary` (shown as ``mean ± std`` over its trials). Numbers are printed in percent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import RetrievalResult
from .trials import METRICS, TrialSummary

__all__ = ["format_table", "plot_cmc", "results_to_json"]

_HEADERS = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "rank20": "Rank-20", "mAP": "mAP",
            "mINP": "mINP"}

Row = tuple[str, RetrievalResult | TrialSummary]


def _rows(results) -> list[Row]:
    if isinstance(results, (RetrievalResult, TrialSummary)):
        label = results.label if isinstance(results, TrialSummary) and results.label else results_label(results)
        return [(label, results)]
    if isinstance(results, Mapping):
        return [(str(k), v) for k, v in results.items()]
    rows = []
    for item in results:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            rows.append((str(item[0]), item[1]))
        else:
            rows.append((results_label(item), item))
    return rows


def results_label(result) -> str:
    if isinstance(result, TrialSummary):
        return result.label or f"{len(result.results)} trials"
    if isinstance(result, RetrievalResult):
        return result.protocol
    raise TypeError(f"expected a RetrievalResult or TrialSummary, got {type(result).__name__}")


def _fmt(value: float, std: float | None = None) -> str:
    if value != value:
        return "-"
    return f"{100 * value:.2f}" if std is None else f"{100 * value:.2f} ± {100 * std:.2f}"


def format_table(results, *, title: str | None = None) -> str:
    """Plain-text table of Rank-1/5/10/20, mAP and mINP (percent).

    Args:
        results: a RetrievalResult or TrialSummary, a mapping ``label -> result``, or a sequence of results or
            ``(label, result)`` pairs (e.g. one row per protocol/mode, or per trial).
    """
    rows = _rows(results)
    if not rows:
        raise ValueError("results is empty; pass at least one RetrievalResult or TrialSummary")
    table = [["Setting"] + [_HEADERS[m] for m in METRICS]]
    for label, res in rows:
        if isinstance(res, TrialSummary):
            table.append([f"{label} ({len(res.results)} trials)"] + [_fmt(res.mean[m], res.std[m]) for m in METRICS])
        elif isinstance(res, RetrievalResult):
            summary = res.summary()
            table.append([label] + [_fmt(summary[m]) for m in METRICS])
        else:
            raise TypeError(f"row {label!r}: expected a RetrievalResult or TrialSummary, got {type(res).__name__}")
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = []
    if title:
        lines.append(title)
    fmt_row = lambda r: "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                                  enumerate(zip(r, widths, strict=True)))
    lines.append(fmt_row(table[0]))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt_row(r) for r in table[1:])
    return "\n".join(lines)


def results_to_json(results, path: str | None = None, *, indent: int = 2) -> str:
    """JSON of several results (``{label: result.to_dict()}``); written to ``path`` when given."""
    data = {label: res.to_dict() for label, res in _rows(results)}
    text = json.dumps(data, indent=indent)
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return text


def plot_cmc(results, path: str, *, title: str = "CMC", standard: bool = False, dpi: int = 120) -> str:
    """Write a PNG of CMC curves (one line per result; TrialSummary: the mean curve with a ±std band).

    Args:
        results: as :func:`format_table`.
        path: output file (PNG).
        standard: plot the standard CMC instead of the reported one (the de-duplicated CMC for SYSU-MM01).
    Returns:
        ``path``. Needs matplotlib (``pip install matplotlib`` or ``pip install 'vireid_fast[plot]'``); the Agg canvas
        is used directly, so no display and no global backend change is involved.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_cmc needs matplotlib: pip install matplotlib (or pip install 'vireid_fast[plot]')"
                          f" ({exc})") from None
    rows = _rows(results)
    if not rows:
        raise ValueError("results is empty; pass at least one RetrievalResult or TrialSummary")
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, res in rows:
        curve, band = _curve(res, standard)
        ranks = np.arange(1, len(curve) + 1)
        (line,) = ax.plot(ranks, 100 * curve, marker="o", markersize=3, label=label)
        if band is not None:
            ax.fill_between(ranks, 100 * (curve - band), 100 * (curve + band), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Matching rate (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _curve(res, standard: bool) -> tuple[np.ndarray, np.ndarray | None]:
    pick = (lambda r: r.cmc) if standard else (lambda r: r.reported_cmc)
    if isinstance(res, RetrievalResult):
        return pick(res), None
    if isinstance(res, TrialSummary):
        curves: Sequence[np.ndarray] = [pick(r) for r in res.results]
        length = min(len(c) for c in curves)
        stack = np.stack([c[:length] for c in curves])
        return stack.mean(0), stack.std(0)
    raise TypeError(f"expected a RetrievalResult or TrialSummary, got {type(res).__name__}")
