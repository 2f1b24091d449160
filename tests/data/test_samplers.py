"""Sampler invariants: P×K structure, outliers never drawn, identities with < K images, modality balance, seeds."""

from collections import Counter

import numpy as np
import pytest

from vireid_fast.data.samplers import CrossModalityPairSampler, IdentityBalancedSampler


def make_labels(rng, num_ids=12, outliers=15):
    sizes = rng.integers(1, 9, num_ids)  # some identities have fewer than K images
    labels = np.concatenate([np.full(s, i * 3) for i, s in enumerate(sizes)] + [np.full(outliers, -1)])
    return rng.permutation(labels)


@pytest.mark.parametrize("P,K", [(4, 4), (3, 2), (12, 1), (1, 5)])
def test_identity_balanced_batches(P, K):
    labels = make_labels(np.random.default_rng(P * 10 + K))
    sampler = IdentityBalancedSampler(labels, P, K, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12 // P
    seen = Counter()
    for batch in batches:
        assert len(batch) == P * K
        batch_labels = labels[batch]
        assert (batch_labels >= 0).all()  # outliers never sampled
        counts = Counter(batch_labels.tolist())
        assert len(counts) == P and set(counts.values()) == {K}
        for label in counts:
            members = [i for i in batch if labels[i] == label]
            if (labels == label).sum() >= K:
                assert len(set(members)) == K  # no repeats when the identity has enough images
        seen.update(counts)
    assert all(v == K for v in seen.values())  # each identity at most once per epoch


def test_num_batches_and_epochs_and_seeds():
    labels = make_labels(np.random.default_rng(0))
    sampler = IdentityBalancedSampler(labels, 4, 2, seed=3, num_batches=10)
    first = list(sampler)
    assert len(first) == 10 and first == list(sampler)  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(IdentityBalancedSampler(labels, 4, 2, seed=4, num_batches=10)) != first


def test_errors():
    with pytest.raises(ValueError, match="only 2 identities with a label >= 0; a batch needs num_identities=3"):
        IdentityBalancedSampler([0, 0, 1, -1, -1], 3, 2)
    with pytest.raises(ValueError, match="num_instances must be a positive integer, got 0"):
        IdentityBalancedSampler([0, 1], 1, 0)
    with pytest.raises(TypeError, match="labels must be integers"):
        IdentityBalancedSampler([0.5, 1.0], 1, 1)
    with pytest.raises(ValueError, match=r"only 1 labels >= 0 occur in both modalities \(2 visible, 2 infrared\)"):
        CrossModalityPairSampler([0, 1], [1, 2], 2, 2)


def test_cross_modality_pairs_share_labels():
    rng = np.random.default_rng(5)
    vis, ir = make_labels(rng, 10, 5), make_labels(rng, 14, 7)
    ir[ir == 0] = -1  # label 0 only visible: never chosen
    sampler = CrossModalityPairSampler(vis, ir, 3, 4, seed=2)
    batches = list(sampler)
    shared = (set(vis.tolist()) & set(ir.tolist())) - {-1}
    assert len(batches) == len(sampler) == len(shared) // 3
    offset = len(vis)
    for batch in batches:
        assert len(batch) == 2 * 3 * 4  # modality balance
        v, i = np.array(batch[:12]), np.array(batch[12:])
        assert (v < offset).all() and (i >= offset).all()
        assert np.array_equal(vis[v], ir[i - offset])  # same label at the same position
        assert set(vis[v].tolist()) <= shared and len(set(vis[v].tolist())) == 3
    assert [list(p) for p in sampler.pairs()][0][0] == batches[0][:12]
