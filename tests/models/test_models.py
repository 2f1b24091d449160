import pytest
import torch

from vireid_fast.models import EMAEncoder, agw_resnet50, build_model, load_pretrained, small_resnet


@pytest.fixture(scope="module")
def agw():
    torch.manual_seed(0)
    return agw_resnet50().eval()


def test_agw_forward_shapes_both_modalities(agw):
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        vis = agw(x, 0)
        ir = agw(x, 1)
    assert vis.shape == ir.shape == (3, 2048) and agw.feature_dim == 2048
    # both stems start from the same weights, but are separate parameters
    torch.testing.assert_close(vis, ir)
    assert agw.visible_stem.conv1.weight.data_ptr() != agw.infrared_stem.conv1.weight.data_ptr()
    with torch.no_grad():
        agw.infrared_stem.conv1.weight.mul_(-1)
        vis = agw(x, 0)
        ir = agw(x, 1)
        mixed = agw(x, torch.tensor([0, 1, 0]))
        pooled, feat = agw(x, 1, return_pooled=True)
    assert pooled.shape == (3, 2048)
    assert not torch.allclose(vis, ir)
    # a mixed batch routes each image through its own stem
    torch.testing.assert_close(mixed[0], vis[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], ir[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feat, ir)


def test_agw_structure(agw):
    assert len(agw.non_local2) == 2 and len(agw.non_local3) == 3
    assert agw.non_local_after[1] == [2, 3] and agw.non_local_after[2] == [3, 4, 5]
    assert agw.layer4[0].conv2.stride == (1, 1)  # last stride 1
    assert not agw.bnneck.bias.requires_grad


def test_bad_modality_argument(agw):
    with pytest.raises(ValueError, match="modality"):
        agw(torch.randn(2, 3, 32, 16), torch.tensor([0, 1, 1]))


def _fake_torchvision_state(model):
    """A torchvision-format ResNet-50 state dict (conv1/bn1 stem, layer1..4, fc) with random values."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("visible_stem."):
            key = key[len("visible_stem."):]
        elif not key.startswith("layer"):
            continue
        state[key] = torch.randn(value.shape, generator=g) if value.is_floating_point() else value.clone()
    state["fc.weight"] = torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_load_torchvision_weights_reports_keys(tmp_path, agw):
    state = _fake_torchvision_state(agw)
    state["layer1.0.conv1.weight"] = torch.randn(7, 7, 1, 1)  # a mismatched shape must be reported and skipped
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = agw_resnet50()
    before = model.layer1[0].conv1.weight.clone()
    report = load_pretrained(model, str(path), verbose=False)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["visible_stem.conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(loaded["infrared_stem.conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(loaded["infrared_stem.bn1.running_var"], state["bn1.running_var"])
    torch.testing.assert_close(loaded["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    torch.testing.assert_close(model.layer1[0].conv1.weight, before)
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert [m[0] for m in report.mismatched] == ["layer1.0.conv1.weight"]
    assert "bnneck.weight" in report.missing and any(k.startswith("non_local2") for k in report.missing)
    assert "layer1.0.conv1.weight" not in report.loaded
    assert "shape mismatch" in report.summary() and "unused keys" in report.summary()


def test_load_weights_errors(tmp_path):
    model = small_resnet()
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(model, str(tmp_path / "missing.pth"))
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no tensor"):
        load_pretrained(model, str(path))


def test_small_resnet_and_factory():
    model = build_model("small_resnet", widths=(8, 16, 16, 32))
    out = model(torch.randn(4, 3, 32, 16), torch.tensor([0, 0, 1, 1]))
    assert out.shape == (4, 32)
    with pytest.raises(ValueError, match="unknown model.arch"):
        build_model("vit")


def test_ema_update():
    torch.manual_seed(0)
    model = small_resnet(widths=(8, 8, 8, 8))
    ema = EMAEncoder(model, beta=0.9)
    old = ema.module.layer1[0].conv1.weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bnneck.running_mean.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.layer1[0].conv1.weight, 0.9 * old + 0.1 * model.layer1[0].conv1.weight)
    assert torch.equal(ema.module.bnneck.running_mean, model.bnneck.running_mean)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="beta"):
        EMAEncoder(model, beta=1.0)
