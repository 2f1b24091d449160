import pytest
import torch

from vireid_fast.methods import DCL, Method, cluster_means, get_method, register_method

from .context import make_context


def test_cluster_means_excludes_outliers():
    # The outlier points away from every cluster, so adding it to any of them (or to the last row, where a label of
    # -1 indexes) changes that cluster's direction; cluster 1 has two members of different lengths, so the mean is
    # of the raw features, normalised once.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 1.0], [-4.0, -7.0]])
    labels = torch.tensor([0, 0, 1, 1, -1])
    means = cluster_means(feats, labels)
    assert means.shape == (2, 2) and means.is_contiguous() and means.dtype == torch.float32
    torch.testing.assert_close(means[0], torch.tensor([0.7071068, 0.7071068]))
    torch.testing.assert_close(means[1], torch.tensor([3.0, 1.0]) / 10.0 ** 0.5)
    assert cluster_means(feats, torch.full((5,), -1)).shape == (0, 2)


def test_dcl_step_losses_and_memory_update():
    from vireid_fast.config import load_config
    from vireid_fast.methods import TrainBatch
    from vireid_fast.models import small_resnet

    torch.manual_seed(0)
    model = small_resnet(widths=(8, 8, 8, 16))
    params = load_config(None, ["method.momentum=0.5"]).method
    method = DCL(params, make_context(model))
    feats = {"visible": {"feature": torch.nn.functional.normalize(torch.randn(12, 16), dim=1)},
             "infrared": {"feature": torch.nn.functional.normalize(torch.randn(9, 16), dim=1)}}
    labels = {"visible": torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1, 0]),
              "infrared": torch.tensor([0, 0, 1, 1, 1, -1, 0, 1, 1])}
    method.build_memories(feats, labels)
    assert method.memories["visible"].shape == (3, 16) and method.memories["infrared"].shape == (2, 16)
    before = {m: t.clone() for m, t in method.memories.items()}
    images = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8)
    batch = TrainBatch(images, torch.tensor([0, 0, 2, 2]), torch.arange(4), images.flip(0),
                       torch.tensor([1, 1, 0, 0]), torch.arange(4))
    losses = method.training_step(batch)
    assert set(losses) == {"visible", "augmented", "infrared"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    # the memory rows of the batch's labels moved, the others did not
    assert not torch.equal(method.memories["visible"][0], before["visible"][0])
    assert torch.equal(method.memories["visible"][1], before["visible"][1])
    assert not torch.equal(method.memories["infrared"][1], before["infrared"][1])
    assert model.visible_stem.conv1.weight.grad is not None and model.infrared_stem.conv1.weight.grad is not None
    restored = DCL(params, make_context(model))
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.memories["visible"], method.memories["visible"])
    assert set(method.state_dict()) == {"memory_visible", "memory_infrared"}


def test_registry():
    assert get_method("dcl") is DCL
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method("dcl")(type("Other", (Method,), {}))


@pytest.mark.parametrize("zeroed", ["visible", "augmented", "infrared"])
def test_dcl_zero_weight_removes_the_term_and_its_memory_update(zeroed):
    # The memory update runs in backward whatever the weight, so a term multiplied by 0 would still move its memory
    # (the channel-augmented stream kept rewriting the visible memory with augmentation_weight=0).
    from vireid_fast.config import load_config
    from vireid_fast.methods import TrainBatch
    from vireid_fast.models import small_resnet

    torch.manual_seed(0)
    model = small_resnet(widths=(8, 8, 8, 16))
    params = load_config(None, ["method.momentum=0.5", f"method.{zeroed}_weight=0"]).method
    method = DCL(params, make_context(model))
    feats = {m: {"feature": torch.nn.functional.normalize(torch.randn(6, 16), dim=1)} for m in ("visible", "infrared")}
    labels = {m: torch.tensor([0, 0, 0, 1, 1, 1]) for m in ("visible", "infrared")}
    method.build_memories(feats, labels)
    before = {m: t.clone() for m, t in method.memories.items()}
    images = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8)
    batch = TrainBatch(images, torch.tensor([0, 0, 1, 1]), torch.arange(4), images.flip(0),
                       torch.tensor([1, 1, 0, 0]), torch.arange(4))
    losses = method.training_step(batch)
    assert set(losses) == {"visible", "augmented", "infrared"} - {zeroed}
    sum(losses.values()).backward()
    # the visible memory is fed by the visible and the augmented terms; it stays only when both are off
    assert not torch.equal(method.memories["visible"], before["visible"])
    assert torch.equal(method.memories["infrared"], before["infrared"]) == (zeroed == "infrared")
    if zeroed != "infrared":
        # with one visible-side term removed, the memory equals a run that never computed it
        ref = DCL(load_config(None, ["method.momentum=0.5"]).method, make_context(model))
        ref.build_memories(feats, labels)
        f_vis, f_aug, f_ir = method.encode_batch(batch)
        kept = f_aug if zeroed == "visible" else f_vis
        ref._loss(kept.detach().requires_grad_(), batch.visible_labels, ref.memory_visible).backward()
        torch.testing.assert_close(method.memories["visible"], ref.memories["visible"])
