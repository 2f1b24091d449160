"""vireid::memory_contrastive: every backend against a community-style oracle, goldens, gradcheck, opcheck, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vireid_fast import _extension
from vireid_fast.ops import memory_contrastive, memory_update
from vireid_fast.ops._registry import triton_status
from vireid_fast.ops.memory_contrastive import MemoryDtypeError

TRITON_OK = triton_status()[0]
BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]


def _skip_unavailable(name: str) -> None:
    if name == "cpp" and not _extension.status()[0]:
        pytest.skip("C++ extension unavailable: " + _extension.status()[1])
    if name == "triton" and not TRITON_OK:
        pytest.skip("triton unavailable: " + triton_status()[1])
    if name == "triton":
        pytest.importorskip("vireid_fast.kernels.memory_contrastive")


class _CommunityCM(torch.autograd.Function):
    """cluster-contrast's autograd Function as the spec describes it: GEMM forward, loop update in backward."""

    @staticmethod
    def forward(ctx, inputs, targets, features, momentum, hard):
        ctx.features, ctx.momentum, ctx.hard = features, momentum, hard
        ctx.save_for_backward(inputs, targets)
        return inputs.mm(features.t())

    @staticmethod
    def backward(ctx, grad_outputs):
        inputs, targets = ctx.saved_tensors
        grad_inputs = grad_outputs.mm(ctx.features)
        if not ctx.hard:
            for x, y in zip(inputs, targets, strict=True):
                ctx.features[y] = ctx.features[y] * ctx.momentum + (1.0 - ctx.momentum) * x
                ctx.features[y] /= ctx.features[y].norm()
        else:
            groups: dict[int, list[torch.Tensor]] = {}
            for x, y in zip(inputs, targets.tolist(), strict=True):
                groups.setdefault(y, []).append(x)
            for y, xs in groups.items():
                sims = [float(x.unsqueeze(0).mm(ctx.features[y].unsqueeze(0).t())[0, 0]) for x in xs]
                pick = xs[min(range(len(sims)), key=sims.__getitem__)]
                ctx.features[y] = ctx.features[y] * ctx.momentum + (1.0 - ctx.momentum) * pick
                ctx.features[y] /= ctx.features[y].norm()
        return grad_inputs, None, None, None, None


def community_step(inputs, targets, memory, temp, momentum, hard=False, soft_targets=None):
    """Loss, input gradient, and the memory after backward (updated in place), the community way."""
    x = inputs.detach().clone().requires_grad_(True)
    logits = _CommunityCM.apply(F.normalize(x, dim=1), targets, memory, momentum, hard) / temp
    loss = F.cross_entropy(logits, targets if soft_targets is None else soft_targets)
    loss.backward()
    return loss.detach(), x.grad


def ours_step(inputs, targets, memory, temp, momentum, update, soft_targets=None):
    x = inputs.detach().clone().requires_grad_(True)
    loss = memory_contrastive(x, targets, memory, temp=temp, momentum=momentum, update=update,
                              soft_targets=soft_targets)
    loss.backward()
    return loss.detach(), x.grad


def make_case(batch, classes, dim, seed=0, labels=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(batch, dim, generator=gen) * 3).to(dtype)
    if labels is None:
        labels = torch.randint(0, classes, (batch,), generator=gen)
    memory = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    return inputs, labels, memory


SHAPES = list(itertools.product([1, 7, 64, 256], [1, 3, 500], [16, 2048]))


@pytest.mark.parametrize("batch,classes,dim", SHAPES)
@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_sequential_matches_community(name, batch, classes, dim, backend):
    _skip_unavailable(name)
    backend(name)
    inputs, targets, memory = make_case(batch, classes, dim, seed=batch * 7 + classes + dim)
    mem_ref, mem_ours = memory.clone(), memory.clone()
    loss_ref, grad_ref = community_step(inputs, targets, mem_ref, 0.05, 0.2)
    loss, grad = ours_step(inputs, targets, mem_ours, 0.05, 0.2, "sequential")
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem_ours, mem_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,classes,dim", [(1, 1, 16), (7, 3, 16), (64, 500, 16), (256, 3, 2048),
                                               (64, 500, 2048)])
@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_hard_matches_community(name, batch, classes, dim, backend):
    _skip_unavailable(name)
    backend(name)
    inputs, targets, memory = make_case(batch, classes, dim, seed=batch + classes + dim)
    mem_ref, mem_ours = memory.clone(), memory.clone()
    loss_ref, grad_ref = community_step(inputs, targets, mem_ref, 0.05, 0.1, hard=True)
    loss, grad = ours_step(inputs, targets, mem_ours, 0.05, 0.1, "hard")
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem_ours, mem_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("update", ["sequential", "hard", "mean", "none"])
@pytest.mark.parametrize("batch,classes,dim,labels", [
    (1, 1, 16, None),
    (7, 3, 16, None),
    (33, 20, 48, "dups"),       # many duplicates, several labels absent
    (24, 5, 40, "one"),         # every sample one label
    (70, 67, 130, None),        # not multiples of any block size
])
def test_backends_agree_with_reference(name, update, batch, classes, dim, labels, backend):
    _skip_unavailable(name)
    gen = torch.Generator().manual_seed(3)
    if labels == "dups":
        labels = torch.tensor([2, 5, 5, 2, 11, 5, 2, 2, 19, 0] * 3 + [5, 5, 2])
    elif labels == "one":
        labels = torch.full((batch,), 3)
    inputs, targets, memory = make_case(batch, classes, dim, seed=int(torch.randint(0, 99, (1,), generator=gen)),
                                        labels=labels)
    mem_ref, mem_ours = memory.clone(), memory.clone()
    backend("reference")
    loss_ref, grad_ref = ours_step(inputs, targets, mem_ref, 0.07, 0.3, update)
    backend(name)
    loss, grad = ours_step(inputs, targets, mem_ours, 0.07, 0.3, update)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem_ours, mem_ref, atol=1e-5, rtol=1e-5)
    absent = torch.ones(classes, dtype=torch.bool)
    absent[targets] = False
    assert torch.equal(mem_ours[absent], memory[absent]), "rows of labels absent from the batch must stay untouched"
    if update == "none":
        assert torch.equal(mem_ours, memory)
    else:
        assert not torch.equal(mem_ours[~absent], memory[~absent])


@pytest.mark.parametrize("name", BACKENDS)
def test_goldens(name, golden, backend):
    _skip_unavailable(name)
    backend(name)
    data = golden("memory.npz")
    for mode in ("sequential", "hard"):
        memory = torch.tensor(data["memory"]).clone()
        loss, grad = ours_step(torch.tensor(data["inputs"]), torch.tensor(data["targets"]), memory,
                               float(data["temp"]), float(data["momentum"]), mode)
        torch.testing.assert_close(loss, torch.tensor(data[f"{mode}_loss"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, torch.tensor(data[f"{mode}_grad_inputs"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(memory, torch.tensor(data[f"{mode}_memory_after"]), atol=1e-5, rtol=0)


def test_repeated_label_is_a_chain_in_batch_order():
    """Two members of one label: the second step starts from the renormalised result of the first."""
    memory = F.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    inputs = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 0, 1])
    expected = memory.clone()
    x = F.normalize(inputs, dim=1)
    for i in (0, 2):
        expected[1] = F.normalize(0.5 * expected[1] + 0.5 * x[i], dim=0)
    expected[0] = F.normalize(0.5 * expected[0] + 0.5 * x[1], dim=0)
    ours_step(inputs, targets, memory, 0.05, 0.5, "sequential")
    torch.testing.assert_close(memory, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_inputs(name, dtype, atol, backend):
    _skip_unavailable(name)
    backend(name)
    inputs, targets, memory = make_case(16, 6, 32, seed=5, dtype=dtype)
    mem_ref, mem_ours = memory.clone(), memory.clone()
    loss_ref, grad_ref = community_step(inputs.float(), targets, mem_ref, 0.05, 0.2)
    loss, grad = ours_step(inputs, targets, mem_ours, 0.05, 0.2, "sequential")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), grad_ref, atol=atol, rtol=atol)
    torch.testing.assert_close(mem_ours, mem_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_soft_targets(name, backend):
    _skip_unavailable(name)
    backend(name)
    inputs, targets, memory = make_case(12, 7, 24, seed=11)
    soft = torch.softmax(torch.randn(12, 7, generator=torch.Generator().manual_seed(2)) * 3, dim=1)
    soft = 0.7 * F.one_hot(soft.argmax(1), 7) + 0.3 * soft  # MULT's soft label
    mem_ref, mem_ours = memory.clone(), memory.clone()
    loss_ref, grad_ref = community_step(inputs, targets, mem_ref, 0.05, 0.2, soft_targets=soft)
    loss, grad = ours_step(inputs, targets, mem_ours, 0.05, 0.2, "sequential", soft_targets=soft)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem_ours, mem_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_soft_targets_gradient_is_not_detached(name, backend):
    _skip_unavailable(name)
    backend(name)
    inputs, targets, memory = make_case(6, 4, 8, seed=1)
    soft = torch.softmax(torch.randn(6, 4), dim=1).requires_grad_(True)
    loss = memory_contrastive(inputs, targets, memory.clone(), soft_targets=soft, update="none")
    loss.backward()
    soft2 = soft.detach().clone().requires_grad_(True)
    logits = F.normalize(inputs, dim=1) @ memory.t() / 0.05
    F.cross_entropy(logits, soft2).backward()
    torch.testing.assert_close(soft.grad, soft2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["reference", "cpp"])
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_float64(name, soft, backend):
    _skip_unavailable(name)
    backend(name)
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(7, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    memory = F.normalize(torch.randn(3, 5, dtype=torch.float64, generator=gen), dim=1)
    targets = torch.tensor([0, 2, 2, 1, 0, 2, 2])
    args = (inputs,)
    if soft:
        args += (torch.softmax(torch.randn(7, 3, dtype=torch.float64, generator=gen), 1).requires_grad_(True),)

    def fn(x, soft_targets=None):
        # gradcheck runs backward twice on one graph and wants equal results, so the memory must not move (the
        # gradient never depends on the update mode; the update itself is checked against the community loop above)
        return memory_contrastive(x, targets, memory, temp=0.5, update="none", soft_targets=soft_targets)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,args", [
    ("memory_contrastive", lambda x, t, m: (x.requires_grad_(True), t, m, None, 0.05, 0.2, "sequential")),
    ("memory_contrastive", lambda x, t, m: (x.requires_grad_(True), t, m, torch.softmax(x.detach() @ m.t(), 1),
                                            0.05, 0.2, "hard")),
    ("memory_contrastive_backward", lambda x, t, m: (torch.tensor(1.0), x, t, m, None, x @ m.t(), torch.randn(9),
                                                     0.05, 0.2, "sequential")),
    ("memory_update", lambda x, t, m: (F.normalize(x, dim=1), t, m, 0.2, "mean")),
])
def test_opcheck(op, args):
    x, t, m = make_case(9, 4, 16, seed=2)
    torch.library.opcheck(getattr(torch.ops.vireid, op).default, args(x, t, m))


def test_torch_compile_training_step_without_graph_breaks():
    torch._dynamo.reset()
    layer = torch.nn.Linear(16, 16)
    inputs, targets, memory = make_case(10, 4, 16, seed=8)
    eager_memory, compiled_memory = memory.clone(), memory.clone()

    def step(x, y, mem):
        return memory_contrastive(layer(x), y, mem, temp=0.05, momentum=0.2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(inputs, targets, compiled_memory)
    loss_c.backward()
    grad_c = layer.weight.grad.clone()
    layer.weight.grad = None
    loss_e = step(inputs, targets, eager_memory)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, layer.weight.grad)
    assert not torch.equal(compiled_memory, memory)
    torch.testing.assert_close(compiled_memory, eager_memory)


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_same_memory_twice_in_one_iteration(name, backend):
    """Like the community: the backward that runs second sees the first backward's update."""
    _skip_unavailable(name)
    backend(name)
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    memory = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    ref_memory, our_memory = memory.clone(), memory.clone()
    xa, xb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = (F.cross_entropy(_CommunityCM.apply(F.normalize(xa, dim=1), targets, ref_memory, 0.2, False) / 0.05,
                            targets)
            + F.cross_entropy(_CommunityCM.apply(F.normalize(xb, dim=1), targets, ref_memory, 0.2, False) / 0.05,
                              targets))
    loss.backward()
    ya, yb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ours = memory_contrastive(ya, targets, our_memory) + memory_contrastive(yb, targets, our_memory)
    ours.backward()
    torch.testing.assert_close(ours, loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ya.grad, xa.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(yb.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_memory, ref_memory, atol=1e-5, rtol=1e-5)


def test_no_update_without_backward():
    inputs, targets, memory = make_case(5, 3, 8, seed=0)
    before = memory.clone()
    with torch.no_grad():
        memory_contrastive(inputs, targets, memory)
    assert torch.equal(memory, before)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("update", ["sequential", "hard", "mean"])
def test_memory_update_function(name, update, backend):
    _skip_unavailable(name)
    inputs, _, memory = make_case(20, 6, 24, seed=12)
    targets = torch.tensor([1, 1, 3, 1, 0, 3, 1, 1, 3, 5] * 2)
    expected, ours = memory.clone(), memory.clone()
    backend("reference")
    memory_update(inputs, targets, expected, momentum=0.4, update=update)
    backend(name)
    memory_update(inputs, targets, ours, momentum=0.4, update=update)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(ours[[2, 4]], memory[[2, 4]])


def _bad(kwargs_update):
    inputs, targets, memory = make_case(4, 3, 8, seed=0)
    kwargs = dict(inputs=inputs, targets=targets, memory=memory)
    kwargs.update(kwargs_update(inputs, targets, memory))
    return kwargs


@pytest.mark.parametrize("change,exc,match", [
    (lambda x, t, m: {"targets": torch.tensor([0, 1, 3, 0])}, ValueError, "targets must lie in"),
    (lambda x, t, m: {"targets": torch.tensor([0, -1, 2, 0])}, ValueError, "targets must lie in"),
    (lambda x, t, m: {"targets": torch.tensor([0, 1, 2])}, ValueError, "targets must be"),
    (lambda x, t, m: {"targets": t.float()}, TypeError, "integer"),
    (lambda x, t, m: {"memory": m[0]}, ValueError, "memory must be 2-D"),
    (lambda x, t, m: {"memory": m.t().contiguous().t()}, ValueError, "contiguous"),
    (lambda x, t, m: {"memory": m.half()}, ValueError, "float32"),
    (lambda x, t, m: {"memory": m.double()}, ValueError, "float32"),
    (lambda x, t, m: {"memory": m.clone().requires_grad_(True)}, ValueError, "require grad"),
    (lambda x, t, m: {"memory": m[:, :4].contiguous()}, ValueError, "share D"),
    (lambda x, t, m: {"inputs": x[:0]}, ValueError, "empty"),
    (lambda x, t, m: {"inputs": x.clone().index_fill_(0, torch.tensor([1]), float("nan"))}, ValueError, "NaN"),
    (lambda x, t, m: {"inputs": x.long()}, TypeError, "dtype"),
    (lambda x, t, m: {"soft_targets": torch.full((4, 3), 0.5)}, ValueError, "summing to 1"),
    (lambda x, t, m: {"soft_targets": torch.full((4, 2), 0.5)}, ValueError, r"\(B, C\)"),
    (lambda x, t, m: {"temp": 0.0}, ValueError, "temp"),
    (lambda x, t, m: {"temp": -1.0}, ValueError, "temp"),
    (lambda x, t, m: {"momentum": 1.0}, ValueError, "momentum"),
    (lambda x, t, m: {"momentum": -0.1}, ValueError, "momentum"),
    (lambda x, t, m: {"update": "median"}, ValueError, "update"),
])
def test_bad_inputs(change, exc, match):
    with pytest.raises(exc, match=match):
        memory_contrastive(**_bad(change))


def test_memory_dtype_error_is_both_value_and_type_error():
    assert issubclass(MemoryDtypeError, ValueError) and issubclass(MemoryDtypeError, TypeError)


def test_raw_ops_reject_out_of_range_targets_without_crashing():
    inputs, _, memory = make_case(4, 3, 8, seed=0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\), got values in \[0, 5\]"):
        torch.ops.vireid.memory_contrastive(inputs, torch.tensor([0, 1, 5, 0]), memory, None, 0.05, 0.2, "sequential")
    with pytest.raises(ValueError, match="update must be one of"):
        torch.ops.vireid.memory_update(F.normalize(inputs, dim=1), torch.tensor([0, 1, 2, 0]), memory, 0.2, "x")


def test_cpp_twins_reject_out_of_range_targets_without_crashing():
    # Behind the validation layer the C++ kernels still refuse what would read out of bounds.
    _skip_unavailable("cpp")
    inputs, _, memory = make_case(4, 3, 8, seed=0)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.vireid._memory_contrastive_cpu(inputs, torch.tensor([0, 1, 5, 0]), memory, None, 0.05, 0.2,
                                                 "sequential")
    with pytest.raises(RuntimeError, match="update must be"):
        torch.ops.vireid._memory_update_cpu(F.normalize(inputs, dim=1), torch.tensor([0, 1, 2, 0]), memory, 0.2, "x")


def test_torch_compile_two_calls_on_one_memory_match_eager():
    torch._dynamo.reset()
    layer = torch.nn.Linear(16, 16)
    inputs, targets, memory = make_case(12, 5, 16, seed=13)
    second = torch.randn(12, 16, generator=torch.Generator().manual_seed(14))

    def step(x, x2, y, mem):
        return memory_contrastive(layer(x), y, mem) + memory_contrastive(layer(x2), y, mem, update="hard")

    results = []
    for compiled in (False, True):
        mem = memory.clone()
        layer.zero_grad()
        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        loss = fn(inputs, second, targets, mem)
        loss.backward()
        results.append((loss.detach(), layer.weight.grad.clone(), mem))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_inputs_and_int32_targets(name, backend):
    _skip_unavailable(name)
    inputs, targets, memory = make_case(9, 4, 24, seed=21)
    wide = torch.cat([inputs, inputs], dim=1)[:, ::2]  # a strided (non-contiguous) view
    assert not wide.is_contiguous()
    expected_memory, memory_ours = memory.clone(), memory.clone()
    backend("reference")
    loss_ref, grad_ref = ours_step(wide.contiguous(), targets, expected_memory, 0.05, 0.2, "sequential")
    backend(name)
    x = wide.detach().requires_grad_(True)
    loss = memory_contrastive(x, targets.int(), memory_ours)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(memory_ours, expected_memory, atol=1e-5, rtol=1e-5)
