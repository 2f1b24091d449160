import json
import sys

import numpy as np
import pytest

from vireid_fast.eval import evaluate, evaluate_trials, format_table, plot_cmc, results_to_json


def _trials(seed, n=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append((rng.standard_normal((30, 25)), rng.integers(0, 5, 30), np.arange(25) % 5, rng.choice([3, 6], 30),
                    rng.choice([1, 2, 4, 5], 25)))
    return out


def test_table_single_and_trials():
    trials = _trials(0)
    single = evaluate(*trials[0], protocol="sysu")
    summary = evaluate_trials(trials, protocol="sysu", label="SYSU all")
    text = format_table({"trial 0": single, "all": summary}, title="SYSU-MM01")
    lines = text.splitlines()
    assert lines[0] == "SYSU-MM01"
    assert lines[1].split() == ["Setting", "Rank-1", "Rank-5", "Rank-10", "Rank-20", "mAP", "mINP"]
    assert f"{100 * single.rank1:.2f}" in lines[3]
    assert f"{100 * summary.mean['mAP']:.2f} ± {100 * summary.std['mAP']:.2f}" in lines[4]
    assert "(3 trials)" in lines[4]
    with pytest.raises(ValueError):
        format_table([])
    with pytest.raises(TypeError):
        format_table([("x", 3.0)])


def test_results_to_json(tmp_path):
    summary = evaluate_trials(_trials(1), protocol="regdb")
    path = tmp_path / "out.json"
    text = results_to_json({"regdb": summary}, str(path))
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert data["regdb"]["num_trials"] == 3
    assert data["regdb"]["mean"]["mAP"] == pytest.approx(summary.mean["mAP"])


def test_plot_cmc_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    trials = _trials(2)
    single = evaluate(*trials[0], protocol="sysu")
    summary = evaluate_trials(trials, protocol="sysu")
    path = plot_cmc({"one": single, "mean": summary}, str(tmp_path / "cmc.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    plot_cmc(single, str(tmp_path / "std.png"), standard=True)
    assert (tmp_path / "std.png").stat().st_size > 1000


def test_plot_cmc_without_matplotlib(tmp_path, monkeypatch):
    single = evaluate(*_trials(3)[0], protocol="sysu")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_cmc(single, str(tmp_path / "x.png"))
