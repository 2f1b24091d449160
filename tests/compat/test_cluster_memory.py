"""compat ClusterMemory: goldens of cluster-contrast's module, epoch-wise buffer reassignment, module behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vireid_fast import _extension
from vireid_fast.compat.clustercontrast import ClusterMemory


def _golden_module(data, use_hard):
    memory = ClusterMemory(data["inputs"].shape[1], data["memory"].shape[0], temp=float(data["temp"]),
                           momentum=float(data["momentum"]), use_hard=use_hard)
    memory.features = F.normalize(torch.tensor(data["memory"]), dim=1)
    return memory


@pytest.mark.parametrize("name", ["cpp", "reference"])
@pytest.mark.parametrize("use_hard,mode", [(False, "sequential"), (True, "hard")])
def test_goldens(name, use_hard, mode, golden, backend):
    if name == "cpp" and not _extension.status()[0]:
        pytest.skip("C++ extension unavailable")
    backend(name)
    data = golden("memory.npz")
    memory = _golden_module(data, use_hard)
    inputs = torch.tensor(data["inputs"], requires_grad=True)
    loss = memory(inputs, torch.tensor(data["targets"]))
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(data[f"{mode}_loss"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(inputs.grad, torch.tensor(data[f"{mode}_grad_inputs"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.features, torch.tensor(data[f"{mode}_memory_after"]), atol=1e-5, rtol=0)


def test_epoch_reassignment_just_works():
    """Every epoch the scripts assign a new, differently sized normalised centre matrix to ``features``."""
    torch.manual_seed(0)
    memory = ClusterMemory(16, 0, momentum=0.1)
    assert "features" in dict(memory.named_buffers())
    for epoch, clusters in enumerate((5, 9, 3)):
        centres = torch.randn(clusters, 16)
        memory.features = F.normalize(centres, dim=1)
        assert memory.features.shape == (clusters, 16)
        inputs = torch.randn(12, 16, requires_grad=True)
        targets = torch.randint(0, clusters, (12,))
        before = memory.features.clone()
        memory(inputs, targets).backward()
        assert not torch.equal(memory.features, before), f"epoch {epoch}: the buffer was not updated"
        assert memory.features is dict(memory.named_buffers())["features"]


def test_buffer_in_another_dtype_or_layout_is_converted():
    memory = ClusterMemory(8, 4)
    memory.features = F.normalize(torch.randn(8, 4), dim=0).t()  # non-contiguous view
    inputs = torch.randn(6, 8, requires_grad=True)
    memory(inputs, torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert memory.features.is_contiguous() and memory.features.dtype == torch.float32
    torch.testing.assert_close(memory.features.norm(dim=1), torch.ones(4))


def test_state_dict_and_to():
    memory = ClusterMemory(8, 3)
    memory.features = F.normalize(torch.randn(3, 8), dim=1)
    state = memory.state_dict()
    assert set(state) == {"features"}
    other = ClusterMemory(8, 3)
    other.load_state_dict(state)
    assert torch.equal(other.features, memory.features)
