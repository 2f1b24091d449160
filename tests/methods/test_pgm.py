"""PGM matching against a literal implementation of pclhd.md §4.1 (brute-force assignment, Python dicts)."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from vireid_fast.methods.pgm import PGMMatch, cluster_centres, pgm_match


def brute_assign(cost):
    """Minimum-cost matching of min(n, m) pairs by enumeration: {row: col}."""
    n, m = len(cost), len(cost[0]) if cost else 0
    if n == 0 or m == 0:
        return {}
    best, best_map = math.inf, None
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            total = sum(cost[i][cols[i]] for i in range(n))
            if total < best:
                best, best_map = total, {i: cols[i] for i in range(n)}
    else:
        for rows in itertools.permutations(range(n), m):
            total = sum(cost[rows[j]][j] for j in range(m))
            if total < best:
                best, best_map = total, {rows[j]: j for j in range(m)}
    return best_map


def literal_pgm(sim, variant="sysu"):
    """The official rounds as the spec states them, on a similarity list-of-lists with K_v >= K_r."""
    kv, kr = len(sim), len(sim[0])
    cost = [[math.exp(-s) for s in row] for row in sim]
    padded = [row + [0.0] * (kv - kr) for row in cost]
    v2r, r2v = {}, {}
    unmatched = []
    for i, j in sorted(brute_assign(padded).items()):
        if j < kr:
            v2r[i], r2v[j] = j, i
        else:
            unmatched.append(i)
    if not unmatched:
        return v2r, r2v
    if len(unmatched) < kr or variant == "regdb":
        for a, j in brute_assign([cost[u] for u in unmatched]).items():
            v2r[unmatched[a]] = j
        return v2r, r2v
    block = [padded[u][: len(unmatched)] for u in unmatched]
    second = []
    for a, j in sorted(brute_assign(block).items()):
        if j < kr:
            v2r[unmatched[a]], r2v[j] = j, unmatched[a]
        else:
            second.append(unmatched[a])
    for a, j in brute_assign([cost[u] for u in second]).items():
        v2r[second[a]], r2v[j] = j, second[a]
    return v2r, r2v


def as_dicts(match: PGMMatch):
    v2r = {i: int(j) for i, j in enumerate(match.visible_to_infrared.tolist()) if j >= 0}
    r2v = {j: int(i) for j, i in enumerate(match.infrared_to_visible.tolist()) if i >= 0}
    return v2r, r2v


def centres_for(sim):
    """Unit centres with cosine matrix ``sim`` (rows of norm <= 1): infrared = orthonormal axes, visible = the row of
    S plus one extra coordinate completing it to unit norm."""
    s = torch.tensor(sim, dtype=torch.float64)
    kv, kr = s.shape
    extra = torch.sqrt((1.0 - (s ** 2).sum(1)).clamp(min=0.0))
    v = torch.cat([s, extra[:, None]], 1)
    r = torch.eye(kr, kr + 1, dtype=torch.float64)
    assert torch.allclose(v.norm(dim=1), torch.ones(kv, dtype=torch.float64))
    return v, r


def test_spec_example_second_round():
    v, r = centres_for([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7]])
    got = as_dicts(pgm_match(v, r))
    assert got == ({0: 0, 1: 0, 2: 1}, {0: 0, 1: 2})
    assert as_dicts(pgm_match(v, r, compat="strict")) == got


def test_spec_example_third_round_overwrites_infrared_map():
    sim = [[0.9, 0.1], [0.8, 0.2], [0.1, 0.7], [0.6, 0.5], [0.3, 0.4]]
    expect = ({0: 0, 1: 0, 2: 1, 3: 1, 4: 1}, {0: 1, 1: 4})
    assert literal_pgm(sim) == expect
    v, r = centres_for(sim)
    assert as_dicts(pgm_match(v, r)) == expect
    assert as_dicts(pgm_match(v, r, compat="strict")) == expect


CASES = [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (7, 2), (7, 3), (6, 3), (5, 4), (7, 7)]


@pytest.mark.parametrize("kv,kr", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_against_literal_random(kv, kr, seed):
    g = torch.Generator().manual_seed(seed * 100 + kv * 10 + kr)
    v = torch.randn(kv, 5, generator=g, dtype=torch.float64)
    r = torch.randn(kr, 5, generator=g, dtype=torch.float64)
    sim = (torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(r, dim=1).T).tolist()
    expect = literal_pgm(sim)
    if len(expect[0]) == kv:
        assert as_dicts(pgm_match(v, r, compat="strict")) == expect
        assert as_dicts(pgm_match(v, r)) == expect
    else:  # K_v > 3 K_r: the official code leaves clusters unmatched
        with pytest.raises(ValueError, match="unmatched"):
            pgm_match(v, r, compat="strict")
    regdb = literal_pgm(sim, "regdb")
    if len(regdb[0]) == kv:
        assert as_dicts(pgm_match(v, r, compat="strict", variant="regdb")) == regdb


def test_more_infrared_clusters_strict_and_safe():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 4, generator=g, dtype=torch.float64)
    r = torch.randn(5, 4, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="infrared clusters > 2 visible"):
        pgm_match(v, r, compat="strict")
    empty = pgm_match(v, r, compat="strict", variant="regdb")
    assert (empty.visible_to_infrared == -1).all() and (empty.infrared_to_visible == -1).all()
    safe = pgm_match(v, r)
    assert safe.swapped
    swapped = pgm_match(r, v)
    assert torch.equal(safe.visible_to_infrared, swapped.infrared_to_visible)
    assert torch.equal(safe.infrared_to_visible, swapped.visible_to_infrared)
    assert (safe.visible_to_infrared >= 0).all() and (safe.infrared_to_visible >= 0).all()


def test_safe_mode_nearest_fallback_when_more_than_three_times():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(9, 4, generator=g, dtype=torch.float64)
    r = torch.randn(2, 4, generator=g, dtype=torch.float64)
    sim = (torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(r, dim=1).T)
    expect_v2r, expect_r2v = literal_pgm(sim.tolist())
    with pytest.warns(UserWarning, match="no Hungarian match"):
        got = pgm_match(v, r)
    assert got.fallback == 9 - len(expect_v2r)
    for i in range(9):
        want = expect_v2r.get(i, int(sim[i].argmax()))
        assert int(got.visible_to_infrared[i]) == want
    assert as_dicts(got)[1] == expect_r2v


def test_invariants_every_cluster_matched():
    for kv, kr in [(3, 3), (4, 2), (6, 2), (8, 3), (3, 5), (1, 4)]:
        g = torch.Generator().manual_seed(kv * 7 + kr)
        match = pgm_match(torch.randn(kv, 6, generator=g), torch.randn(kr, 6, generator=g))
        assert (match.visible_to_infrared >= 0).all() and (match.infrared_to_visible >= 0).all()
        assert match.visible_to_infrared.max() < kr and match.infrared_to_visible.max() < kv
        if kr <= kv <= 3 * kr:  # every infrared cluster gets 1..ceil visible clusters; r->v points at a v of it
            counts = torch.bincount(match.visible_to_infrared, minlength=kr)
            assert (counts >= 1).all()


def test_empty_clusters_and_outliers():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, -1])  # cluster 1 empty, one outlier
    centres, counts = cluster_centres(feats, labels)
    assert counts.tolist() == [2, 0, 1]
    torch.testing.assert_close(centres[0], torch.tensor([0.95, 0.05], dtype=torch.float64))
    assert (centres[1] == 0).all()
    r = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    match = pgm_match(centres, r)
    assert match.visible_to_infrared.tolist() == [1, -1, 0]
    assert match.infrared_to_visible.tolist() == [2, 0]
    mapped = match.map_labels(torch.tensor([0, 1, 2, -1]), "visible")
    assert mapped.tolist() == [1, -1, 0, -1]
    assert match.map_labels(torch.tensor([0, 1]), "infrared").tolist() == [2, 0]
    none = pgm_match(torch.zeros(2, 2), r)
    assert (none.visible_to_infrared == -1).all() and (none.infrared_to_visible == -1).all()
    assert pgm_match(torch.zeros(0, 2), r).visible_to_infrared.numel() == 0


def test_ties_follow_the_solver_and_are_optimal():
    # all clusters identical: every assignment costs the same; result deterministic, complete and injective
    v = torch.ones(4, 3, dtype=torch.float64)
    r = torch.ones(4, 3, dtype=torch.float64)
    a, b = pgm_match(v, r), pgm_match(v, r)
    assert torch.equal(a.visible_to_infrared, b.visible_to_infrared)
    assert sorted(a.visible_to_infrared.tolist()) == [0, 1, 2, 3]
    assert torch.equal(a.infrared_to_visible[a.visible_to_infrared], torch.arange(4))


def test_argument_errors():
    with pytest.raises(ValueError, match="compat"):
        pgm_match(torch.ones(1, 2), torch.ones(1, 2), compat="loose")
    with pytest.raises(ValueError, match="share D"):
        pgm_match(torch.ones(1, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        pgm_match(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pgm_match(torch.eye(3), torch.eye(3))  # no warning on the regular path
    assert np.array_equal(pgm_match(torch.eye(3), torch.eye(3)).visible_to_infrared.numpy(), [0, 1, 2])
