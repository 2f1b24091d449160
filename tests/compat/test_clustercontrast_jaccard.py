"""cluster-contrast drop-ins against the goldens (the community's output) and sklearn's DBSCAN."""

import numpy as np
import pytest
import scipy.sparse
from sklearn.cluster import DBSCAN

from tests.golden_utils import golden_dense
from vireid_fast.compat.clustercontrast import cluster, compute_jaccard_distance, compute_jaccard_distance_sparse


@pytest.mark.parametrize("k1, k2", [(20, 6), (30, 6), (30, 1)])
def test_compute_jaccard_distance_golden(golden, k1, k2, capsys):
    import torch

    g = golden("jaccard.npz")
    feats = torch.from_numpy(g["features"])
    dist = compute_jaccard_distance(feats, k1=k1, k2=k2, print_flag=True, search_option=3)
    assert isinstance(dist, np.ndarray) and dist.dtype == np.float32
    np.testing.assert_allclose(dist, golden_dense(g, k1, k2), rtol=0, atol=1e-5)
    assert "Computing jaccard distance" in capsys.readouterr().out
    half = compute_jaccard_distance(g["features"], k1=k1, k2=k2, print_flag=False, use_float16=True)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), dist, atol=1e-3)
    sparse = compute_jaccard_distance_sparse(feats, k1=k1, k2=k2, print_flag=False)
    assert isinstance(sparse, scipy.sparse.csr_matrix)
    rebuilt = np.ones_like(dist)
    coo = sparse.tocoo()
    rebuilt[coo.row, coo.col] = coo.data
    np.testing.assert_array_equal(rebuilt, dist)


@pytest.mark.parametrize("eps, min_samples", [(0.6, 4), (0.5, 4), (0.9, 2)])
def test_cluster_matches_sklearn_on_golden(golden, eps, min_samples):
    g = golden("jaccard.npz")
    dense = golden_dense(g, 30, 6)
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    labels = cluster(g["features"], eps=eps, min_samples=min_samples, k1=30, k2=6)
    np.testing.assert_array_equal(labels, expected)
