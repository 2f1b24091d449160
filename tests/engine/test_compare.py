"""``vireid-fast compare``: planning (same budget, per-method sections), aggregation over seeds, the table, and one
end-to-end run of two methods on the tiny set."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from vireid_fast.cli import main
from vireid_fast.config import ConfigError
from vireid_fast.engine.compare import aggregate, plan_runs, render_markdown, summarise_run

from .tiny import TINY_OVERRIDES, tiny_root


def _rows(map_value, ari_first, ari_last):
    return [
        {"epoch": 0, "rank1": 1.0, "mAP": 2.0, "mINP": 0.5, "time/eval": 1.0},
        {"epoch": 1, "ari/visible": ari_first, "ari/infrared": 0.1, "time/extract": 2.0, "time/cluster": 1.0,
         "time/train": 4.0, "time/eval": 0.0},
        {"epoch": 2, "ari/visible": ari_last, "ari/infrared": 0.2, "rank1": map_value + 1, "mAP": map_value,
         "mINP": 1.0, "time/extract": 4.0, "time/cluster": 3.0, "time/train": 6.0, "time/eval": 2.0},
    ]


def test_aggregate_is_mean_and_sample_std_over_seeds():
    per_run = {"dcl": {0: summarise_run(_rows(10.0, 0.5, 0.6)), 1: summarise_run(_rows(20.0, 0.7, 0.8))}}
    table = aggregate(per_run)
    mean, std = table["dcl"]["mAP"]
    assert mean == 15.0 and std == pytest.approx(math.sqrt(50.0))
    assert table["dcl"]["first/ari/visible"] == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert table["dcl"]["untrained/mAP"] == (2.0, 0.0)
    # per-epoch phases are means over epochs; eval is the mean over evaluations only
    assert table["dcl"]["time"]["extract"] == 3.0 and table["dcl"]["time"]["eval"] == 2.0
    text = render_markdown(table, "ctx")
    assert "| dcl | 16.0 ± 7.1 | 15.0 ± 7.1 |" in text and "untrained start" in text
    assert "— (two label spaces)" in text


def test_association_columns_and_a_methods_own_phases():
    # main space -> "p / r"; only named spaces (SALCR) -> one "name: p / r" per space; own phases -> "other"
    main, named = _rows(10.0, 0.5, 0.6), _rows(10.0, 0.5, 0.6)
    main[-1].update({"xmod/precision": 0.25, "xmod/recall": 0.5})
    named[-1].update({"xmod/visible_space/precision": 0.1, "xmod/visible_space/recall": 0.2,
                      "xmod/infrared_space/precision": 0.3, "xmod/infrared_space/recall": 0.4, "time/cluster_all": 5.0})
    table = aggregate({"a": {0: summarise_run(main)}, "b": {0: summarise_run(named)}})
    text = render_markdown(table, "ctx")
    assert "| 0.250 ± 0.000 / 0.500 ± 0.000 |" in text
    assert ("infrared_space: 0.300 ± 0.000 / 0.400 ± 0.000; visible_space: 0.100 ± 0.000 / 0.200 ± 0.000 |"
            in text)
    assert table["b"]["time"]["other"] == 2.5 and table["a"]["time"]["other"] == 0.0


def test_plan_runs_shares_the_budget_and_takes_each_methods_section(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"epochs": 7}, "method": {"name": "dcl", "temp": 0.07}}))
    (tmp_path / "supervised_synthetic.yaml").write_text(yaml.safe_dump({"method": {"name": "supervised",
                                                                                   "cross_weight": 0.5}}))
    runs = plan_runs(str(base), ["dcl", "supervised"], [0, 3], ["train.iters=5"], str(tmp_path / "out"),
                     config_dir=str(tmp_path))
    assert [(r.method, r.seed) for r in runs] == [("dcl", 0), ("dcl", 3), ("supervised", 0), ("supervised", 3)]
    for run in runs:
        assert run.raw_config["train"] == {"epochs": 7, "iters": 5}
        assert run.raw_config["experiment"]["seed"] == run.seed
    # the base file's method section is the base method's; other methods take their own file or just the name
    assert runs[0].raw_config["method"] == {"name": "dcl"}
    assert runs[2].raw_config["method"] == {"name": "supervised", "cross_weight": 0.5}
    with pytest.raises(ConfigError, match="unknown method"):
        plan_runs(str(base), ["dcl", "nope"], [0], [], str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="train.iters"):
        plan_runs(str(base), ["dcl"], [0], ["train.iters=-1"], str(tmp_path / "out"))


def test_compare_end_to_end(tmp_path_factory, tmp_path, capsys):
    root = tiny_root(tmp_path_factory)
    base = tmp_path / "base.yaml"
    base.write_text("{}\n")
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "dcl,supervised", "--seeds", "0", "--config", str(base), "--data-root", root,
                 "--output-dir", str(out), "--jobs", "2", *TINY_OVERRIDES, "train.epochs=1"])
    assert code == 0, capsys.readouterr()
    result = json.load(open(out / "results.json"))
    assert set(result["methods"]) == {"dcl", "supervised"}
    supervised = result["methods"]["supervised"]
    assert supervised["first/ari/visible"][0] == 1.0 and supervised["last/xmod/precision"][0] == 1.0
    text = (out / "results.md").read_text()
    assert "| dcl |" in text and "| supervised |" in text
    assert (out / "dcl" / "seed0" / "metrics.jsonl").exists() and (out / "results.png").exists()
    assert main(["compare", "--methods", "nope", "--config", str(base)]) == 2
    assert "error: --methods: unknown method(s) nope" in capsys.readouterr().err
