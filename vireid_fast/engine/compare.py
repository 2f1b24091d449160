"""``vireid-fast compare``: several methods on the same data, seeds and budget, and the table a paper would print.

Every run takes the base config (default: the demo config) for data, model, clustering, schedule and evaluation;
only the ``method:`` section differs — the method's own section from ``configs/<method>_synthetic.yaml`` when that
file exists, else just ``method.name``. Overrides apply to every run. Each run trains in its own process (``jobs`` at
a time) into ``<output_dir>/<method>/seed<k>/`` (config.yaml, train.log, metrics.jsonl, checkpoint), and the
comparison is written to ``results.json``, ``results.md`` and ``results.png`` in ``output_dir``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import yaml

from ..config import ConfigError, from_dict, merge, parse_overrides
from ..methods import METHODS
from .trainer import PHASES, build_encoder

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
RETRIEVAL = ("rank1", "mAP", "mINP")


class RunFailedError(RuntimeError):
    """A training run of the comparison exited with an error (the message names its log)."""


@dataclass
class RunSpec:
    method: str
    seed: int
    output_dir: str
    raw_config: dict


def method_section(method: str, config_dir: str = CONFIG_DIR) -> dict:
    """The ``method:`` section of ``configs/<method>_synthetic.yaml`` if it exists, else ``{"name": method}``."""
    path = os.path.join(config_dir, f"{method}_synthetic.yaml")
    if os.path.isfile(path):
        with open(path) as f:
            section = (yaml.safe_load(f) or {}).get("method") or {}
        if section.get("name", method) != method:
            raise ConfigError(f"{path}: method.name is {section.get('name')!r}, expected {method!r}")
        return {**section, "name": method}
    return {"name": method}


def plan_runs(base_config: str, methods: list[str], seeds: list[int], overrides: list[str], output_dir: str,
              config_dir: str = CONFIG_DIR) -> list[RunSpec]:
    """One validated config per (method, seed); raises ConfigError naming the bad key or method."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)}; registered: "
                          f"{', '.join(sorted(METHODS))}")
    if not methods:
        raise ConfigError("--methods: name at least one method, e.g. --methods dcl,supervised")
    if not seeds:
        raise ConfigError("--seeds: name at least one seed, e.g. --seeds 0,1")
    if not os.path.isfile(base_config):
        raise ConfigError(f"--config: {base_config} not found (the demo config lives in configs/)")
    with open(base_config) as f:
        base = yaml.safe_load(f) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{base_config}: must be a mapping of sections (experiment, data, model, ...)")
    extra = parse_overrides(overrides)
    runs = []
    for method in methods:
        for seed in seeds:
            run_dir = os.path.join(output_dir, method, f"seed{seed}")
            raw = merge({k: v for k, v in base.items() if k != "method"},
                        {"method": method_section(method, config_dir)})
            raw = merge(raw, extra)
            raw = merge(raw, {"experiment": {"seed": seed, "output_dir": run_dir, "name": f"{method}_seed{seed}"}})
            from_dict(raw)  # validate now, before any run starts
            runs.append(RunSpec(method, seed, run_dir, raw))
    return runs


def _prepare_shared(raw: dict, data_root: str | None, log) -> None:
    """Generate the synthetic data and resolve the pretrained weights once, before runs start in parallel."""
    from ..models import load_pretrained
    from .data import resolve_root

    config = from_dict(raw)
    resolve_root(config, data_root, log)
    if config.model.pretrained:
        load_pretrained(build_encoder(config.model), config.model.pretrained, verbose=False,
                        image_size=tuple(config.data.image_size), log=log)


def _train(run: RunSpec, data_root: str | None) -> tuple[RunSpec, int, float]:
    os.makedirs(run.output_dir, exist_ok=True)
    path = os.path.join(run.output_dir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(run.raw_config, f, sort_keys=False)
    command = [sys.executable, "-m", "vireid_fast.cli", "train", "--config", path, "--no-progress"]
    if data_root:
        command += ["--data-root", data_root]
    start = time.perf_counter()
    with open(os.path.join(run.output_dir, "train.log"), "w") as log_file:
        code = subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT)
    return run, code, time.perf_counter() - start


def summarise_run(rows: list[dict]) -> dict:
    """One run's figures from its metrics rows: untrained/trained retrieval, first/last-epoch pseudo-label quality,
    mean seconds per epoch of each phase (eval: per evaluation)."""
    epochs = [r for r in rows if r.get("epoch", 0) > 0]
    evaluated = [r for r in epochs if "mAP" in r]
    untrained = [r for r in rows if r.get("epoch") == 0 and "mAP" in r]
    if not evaluated:
        raise ValueError("the run has no evaluated epoch (metrics.jsonl incomplete)")
    out = {"epochs": len(epochs), "trained": {k: evaluated[-1][k] for k in RETRIEVAL},
           "untrained": {k: untrained[-1][k] for k in RETRIEVAL} if untrained else None}
    for tag, row in (("first", epochs[0]), ("last", epochs[-1])):
        for key in ("ari/visible", "ari/infrared", "clusters/visible", "clusters/infrared"):
            if key in row:
                out[f"{tag}/{key}"] = row[key]
        # the association's pair precision/recall: the main space and any named ones (xmod/<space>/precision)
        out.update({f"{tag}/{key}": value for key, value in row.items() if key.startswith("xmod/")})
    times = {}
    for phase in PHASES:
        source = evaluated if phase == "eval" else epochs
        values = [r.get(f"time/{phase}", 0.0) for r in source]
        times[phase] = float(np.mean(values)) if values else 0.0
    standard = {f"time/{phase}" for phase in PHASES}
    times["other"] = float(np.mean([sum(v for k, v in r.items() if k.startswith("time/") and k not in standard)
                                    for r in epochs]))
    out["time"] = times
    out["curves"] = {key: [r.get(key) for r in epochs] for key in ("ari/visible", "ari/infrared", "mAP")}
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(per_run: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method: mean and std over seeds of every figure of :func:`summarise_run`."""
    table = {}
    for method, runs in per_run.items():
        summaries = list(runs.values())
        entry: dict = {"seeds": sorted(runs)}
        for k in RETRIEVAL:
            entry[k] = _mean_std([s["trained"][k] for s in summaries])
            if all(s["untrained"] for s in summaries):
                entry[f"untrained/{k}"] = _mean_std([s["untrained"][k] for s in summaries])
        keys = {k for s in summaries for k in s if k.startswith(("first/", "last/"))}
        for k in sorted(keys):
            entry[k] = _mean_std([s.get(k) for s in summaries])
        entry["time"] = {phase: _mean_std([s["time"].get(phase, 0.0) for s in summaries])[0]
                         for phase in (*PHASES, "other")}
        table[method] = entry
    return table


def _fmt(pair, digits: int = 1) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_markdown(table: dict[str, dict], context: str) -> str:
    lines = [f"# Method comparison\n\n{context}\n",
             "| method | Rank-1 (%) | mAP (%) | mINP (%) | ARI visible (epoch 1 → last) "
             "| ARI infrared (epoch 1 → last) | cross-modality pair precision / recall (last) |",
             "|---|---|---|---|---|---|---|"]
    untrained_row = None
    for method, e in table.items():
        if untrained_row is None and "untrained/mAP" in e:
            untrained_row = (f"| untrained start (before any method) | {_fmt(e['untrained/rank1'])} | "
                             f"{_fmt(e['untrained/mAP'])} | {_fmt(e['untrained/mINP'])} | | | |")
        named = sorted(k[len("last/xmod/"):-len("/precision")] for k in e
                       if k.startswith("last/xmod/") and k.endswith("/precision") and k.count("/") == 3)
        if "last/xmod/precision" in e:
            xmod = f"{_fmt(e['last/xmod/precision'], 3)} / {_fmt(e['last/xmod/recall'], 3)}"
        elif named:
            xmod = "; ".join(f"{name}: {_fmt(e[f'last/xmod/{name}/precision'], 3)} / "
                             f"{_fmt(e[f'last/xmod/{name}/recall'], 3)}" for name in named)
        else:
            xmod = "— (two label spaces)"
        lines.append(f"| {method} | {_fmt(e['rank1'])} | {_fmt(e['mAP'])} | {_fmt(e['mINP'])} | "
                     f"{_fmt(e.get('first/ari/visible', (math.nan, 0)), 3)} → "
                     f"{_fmt(e.get('last/ari/visible', (math.nan, 0)), 3)} | "
                     f"{_fmt(e.get('first/ari/infrared', (math.nan, 0)), 3)} → "
                     f"{_fmt(e.get('last/ari/infrared', (math.nan, 0)), 3)} | {xmod} |")
    if untrained_row:
        lines.insert(3, untrained_row)
    lines += ["", "Mean ± sample standard deviation over seeds. ARI: pseudo-labels against the true identities "
              "(outliers as singletons; reported, never used for training). Cross-modality pairs: among (visible, "
              "infrared) image pairs, precision = same pseudo-label and same identity / same pseudo-label, recall = "
              "same pseudo-label and same identity / same identity.", "",
              "Seconds per epoch (mean over epochs and seeds; eval: per evaluation; other: the method's own timed "
              "phases, e.g. PCLHD's EMA extraction and all-modality clustering):", "",
              "| method | " + " | ".join((*PHASES, "other")) + " |", "|---|" + "---|" * (len(PHASES) + 1)]
    for method, e in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{e['time'][p]:.2f}" for p in (*PHASES, "other")) + " |")
    return "\n".join(lines) + "\n"


def plot(per_run: dict[str, dict[int, dict]], table: dict[str, dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(table)
    means = [table[m]["mAP"][0] for m in names]
    stds = [table[m]["mAP"][1] for m in names]
    axes[0].bar(names, means, yerr=stds, capsize=4, color="tab:blue")
    axes[0].set_title("trained mAP (%), mean ± std over seeds", fontsize=9)
    for ax, key in ((axes[1], "ari/visible"), (axes[2], "ari/infrared")):
        for method, runs in per_run.items():
            curves = np.array([s["curves"][key] for s in runs.values()], dtype=float)
            ax.plot(np.arange(1, curves.shape[1] + 1), np.nanmean(curves, 0), marker="o", ms=2, label=method)
        ax.set_title(f"pseudo-label {key.replace('/', ' ')} per epoch", fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def compare(methods: list[str], seeds: list[int], *, base_config: str, overrides: list[str], output_dir: str,
            data_root: str | None = None, jobs: int = 1, log=print) -> dict:
    """Train every (method, seed), then write results.json / results.md / results.png in ``output_dir``; returns the
    aggregated table. Raises ConfigError before training on a bad method, seed list or override, and RunFailedError
    naming the run's log when a run fails."""
    runs = plan_runs(base_config, methods, seeds, overrides, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    _prepare_shared(runs[0].raw_config, data_root, log)
    log(f"compare: {len(runs)} runs ({', '.join(methods)} x seeds {', '.join(map(str, seeds))}), {jobs} at a time, "
        f"into {output_dir}")
    start = time.perf_counter()
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for run, code, seconds in pool.map(lambda r: _train(r, data_root), runs):
            status = "done" if code == 0 else f"FAILED (exit {code})"
            log(f"  {run.method} seed {run.seed}: {status} in {seconds:.0f} s ({run.output_dir}/train.log)")
            if code != 0:
                failed.append(run)
    if failed:
        raise RunFailedError("runs failed: " + ", ".join(f"{r.method} seed {r.seed} (see {r.output_dir}/train.log)"
                                                        for r in failed))
    per_run: dict[str, dict[int, dict]] = {}
    for run in runs:
        with open(os.path.join(run.output_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        per_run.setdefault(run.method, {})[run.seed] = summarise_run(rows)
    table = aggregate(per_run)
    config = from_dict(runs[0].raw_config)
    context = (f"Dataset `{config.data.dataset}` ({config.data.synthetic_size}, {config.data.synthetic_ids or 'preset'}"
               f" identities, seed {config.data.synthetic_seed})" if config.data.dataset == "synthetic"
               else f"Dataset `{config.data.dataset}`")
    context += (f", model `{config.model.arch}` from `{config.model.pretrained or 'random init'}`, "
                f"{config.train.epochs} epochs x {config.train.iters} iterations, seeds {', '.join(map(str, seeds))}; "
                f"wall time {time.perf_counter() - start:.0f} s with {jobs} parallel run(s).")
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"context": context, "methods": table, "runs": per_run}, f, indent=1, default=float)
    markdown = render_markdown(table, context)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot(per_run, table, os.path.join(output_dir, "results.png"))
    return {"table": table, "markdown": markdown, "per_run": per_run}


__all__ = ["RunFailedError", "aggregate", "compare", "method_section", "plan_runs", "render_markdown", "summarise_run"]
