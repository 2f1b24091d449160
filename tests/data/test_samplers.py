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


def _camera_case():
    # label 0: cameras 1,1,2,2,2 (other-camera candidates: 2 or 3, fewer than K -> with replacement);
    # label 1: one camera only (fallback: the other members); label 2: a single image (contributes it alone);
    # label 3: six cameras (5 candidates >= K -> without replacement); -1: outliers, never drawn.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, -1, -1])
    cameras = np.array([1, 1, 2, 2, 2, 3, 3, 3, 1, 1, 2, 3, 4, 5, 6, 1, 2])
    return labels, cameras


def test_camera_aware_pass_follows_the_community_rule():
    from vireid_fast.data import CameraAwareSampler

    labels, cameras = _camera_case()
    sampler = CameraAwareSampler(labels, cameras, batch_size=8, num_instances=4, seed=3)
    assert sampler.pass_length == 4 + 4 + 1 + 4
    for trial in range(30):
        flat = sampler.one_pass(np.random.default_rng(trial))
        assert len(flat) == sampler.pass_length and all(labels[i] >= 0 for i in flat)
        chunks, at = {}, 0
        while at < len(flat):  # each label's entries are contiguous, its anchor first
            label = labels[flat[at]]
            size = 1 if label == 2 else 4
            chunk = flat[at:at + size]
            assert all(labels[i] == label for i in chunk)
            chunks[int(label)] = chunk
            at += size
        assert sorted(chunks) == [0, 1, 2, 3]
        for label in (0, 3):  # members from other cameras than the anchor's
            anchor, rest = chunks[label][0], chunks[label][1:]
            assert all(cameras[i] != cameras[anchor] for i in rest)
        assert len(set(chunks[3][1:])) == 3  # enough candidates: drawn without replacement
        anchor = chunks[1][0]
        assert all(i != anchor for i in chunks[1][1:])  # one camera only: the other members


def test_camera_aware_batches_count_epochs_and_short_passes():
    from vireid_fast.data import CameraAwareSampler

    labels, cameras = _camera_case()
    sampler = CameraAwareSampler(labels, cameras, batch_size=8, num_instances=4, seed=3, num_batches=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5 and all(len(b) == 8 for b in batches)
    assert batches == list(sampler)  # deterministic for (seed, epoch)
    sampler.set_epoch(1)
    assert batches != list(sampler)
    # a pass (13 indices) shorter than a batch: passes are joined rather than yielding nothing
    wide = CameraAwareSampler(labels, cameras, batch_size=32, num_instances=4, seed=0, num_batches=2)
    assert [len(b) for b in wide] == [32, 32]
    with pytest.raises(ValueError, match="no label >= 0"):
        CameraAwareSampler(np.full(3, -1), np.zeros(3), batch_size=4, num_instances=2)
    with pytest.raises(ValueError, match="cameras must have"):
        CameraAwareSampler(labels, cameras[:-1], batch_size=4, num_instances=2)
