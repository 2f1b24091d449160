import numpy as np
import pytest

from vireid_fast.engine.metrics import MetricsLog, adjusted_rand_index, normalized_mutual_info, plot_curves

sklearn = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ari_nmi_match_sklearn_with_outliers_as_singletons(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 6, 80)
    pred = np.where(rng.random(80) < 0.7, truth, rng.integers(-1, 5, 80))
    singletons = pred.copy()
    singletons[pred < 0] = 100 + np.arange((pred < 0).sum())
    assert adjusted_rand_index(truth, pred) == pytest.approx(sklearn.adjusted_rand_score(truth, singletons))
    assert normalized_mutual_info(truth, pred) == pytest.approx(
        sklearn.normalized_mutual_info_score(truth, singletons))


def test_perfect_clustering():
    truth = np.array([3, 3, 5, 5, 7])
    assert adjusted_rand_index(truth, np.array([0, 0, 1, 1, 2])) == pytest.approx(1.0)
    assert normalized_mutual_info(truth, np.array([0, 0, 1, 1, 2])) == pytest.approx(1.0)


def test_jsonl_and_curves(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    log.append({"epoch": 0, "mAP": 3.0})
    log.append({"epoch": 1, "loss/total": 2.0, "clusters/visible": 4, "mAP": 5.0, "time/train": 1.0})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"mAP": 5.0' in lines[1]
    png = plot_curves(log.rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and png
