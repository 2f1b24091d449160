"""Memory-bank contrastive loss with the momentum update fused into its backward (cluster-contrast ClusterMemory).

``memory_contrastive(inputs, targets, memory)`` computes ``CE(normalize(inputs) @ memory.T / temp, targets)`` and, in
the backward, first the gradient w.r.t. the un-normalised ``inputs`` (with ``memory`` as it is then, before this call's
update) and then the in-place momentum update of ``memory``. The op pair is
``vireid::memory_contrastive`` (forward: loss, logits, log-sum-exp) and ``vireid::memory_contrastive_backward``
(gradient, then ``memory`` mutated — declared ``Tensor(a!)``), linked by ``torch.library.register_autograd``.

Calling the same memory twice in one iteration (MULT and SALCR do): exactly as in the community code, each call's
backward computes its gradient with the memory as it is when that backward runs — the forward logits are the ones of
the forward pass, but ``memory`` may already hold the other call's update — and then applies its own update. The
autograd engine runs the later call's backward first. Nothing is cloned, so no version-counter error is raised.
"""

from __future__ import annotations

import torch

from . import _registry
from ._checks import (
    after_memory_contrastive,
    check_memory_contrastive,
    check_memory_contrastive_backward,
    check_memory_update,
    finite,
    number,
)
from ._validation import FLOAT_DTYPES, check_same_device, check_tensor
from .reference import (
    MEMORY_UPDATE_MODES,
    memory_contrastive_backward_ref,
    memory_contrastive_ref,
    memory_update_ref,
)

__all__ = ["MEMORY_UPDATE_MODES", "memory_contrastive", "memory_update"]


class MemoryDtypeError(TypeError, ValueError):
    """``memory`` has a dtype the op cannot update in place (a ValueError and a TypeError)."""


def _forward_fake(inputs, targets, memory, soft_targets, temp, momentum, update):
    batch, classes = inputs.shape[0], memory.shape[0]
    return memory.new_empty(()), memory.new_empty((batch, classes)), memory.new_empty((batch,))


def _backward_fake(grad_loss, inputs, targets, memory, soft_targets, logits, lse, temp, momentum, update):
    return torch.empty_like(inputs)


def _update_fake(normalized, targets, memory, momentum, update):
    return None


_registry.register("memory_contrastive", reference=memory_contrastive_ref, fake=_forward_fake,
                   check=check_memory_contrastive, after=after_memory_contrastive)
_registry.register("memory_contrastive_backward", reference=memory_contrastive_backward_ref, fake=_backward_fake,
                   check=check_memory_contrastive_backward, kernel_module="memory_contrastive",
                   launcher="launch_backward")
_registry.register("memory_update", reference=memory_update_ref, fake=_update_fake, check=check_memory_update,
                   kernel_module="memory_contrastive", launcher="launch_update")


def _setup_context(ctx, inputs, output):
    inp, targets, memory, soft_targets, temp, momentum, update = inputs
    _, logits, lse = output
    ctx.mark_non_differentiable(logits, lse)
    ctx.set_materialize_grads(False)  # no (B, C) zeros for the logits' absent gradient
    ctx.save_for_backward(inp, targets, soft_targets, logits, lse)
    # Kept as a plain reference, not saved: the backward must see (and update) the live buffer, which another call's
    # backward may already have updated (see the module docstring).
    ctx.memory = memory
    ctx.hyper = (temp, momentum, update)


def _soft_grad(grad_loss, logits, lse):
    # d/dt of -mean_i sum_j t_ij log p_ij; the targets are *not* detached (MULT's OCLR keeps their gradient).
    return -(logits - lse[:, None]) * (grad_loss / logits.shape[0])


def _backward(ctx, grad_loss, grad_logits, grad_lse):
    if grad_loss is None:  # grads are not materialised: the loss took no part in this backward
        return None, None, None, None, None, None, None
    inp, targets, soft_targets, logits, lse = ctx.saved_tensors
    temp, momentum, update = ctx.hyper
    grad_inputs = torch.ops.vireid.memory_contrastive_backward(grad_loss, inp, targets, ctx.memory, soft_targets,
                                                               logits, lse, temp, momentum, update)
    grad_soft = None
    if soft_targets is not None and ctx.needs_input_grad[3]:
        grad_soft = _soft_grad(grad_loss, logits, lse).to(soft_targets.dtype)
    return (grad_inputs if ctx.needs_input_grad[0] else None), None, None, grad_soft, None, None, None


torch.library.register_autograd("vireid::memory_contrastive", _backward, setup_context=_setup_context)


class _EagerMemoryContrastive(torch.autograd.Function):
    """Same autograd contract for the routes that bypass the dispatcher (the reference, Triton on CPU tensors)."""

    @staticmethod
    def forward(ctx, inputs, targets, memory, soft_targets, temp, momentum, update, forward_fn, backward_fn):
        loss, logits, lse = forward_fn(inputs, targets, memory, soft_targets, temp, momentum, update)
        ctx.save_for_backward(inputs, targets, soft_targets, logits, lse)
        ctx.memory = memory
        ctx.hyper = (temp, momentum, update)
        ctx.backward_fn = backward_fn
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        inp, targets, soft_targets, logits, lse = ctx.saved_tensors
        temp, momentum, update = ctx.hyper
        grad_inputs = ctx.backward_fn(grad_loss, inp, targets, ctx.memory, soft_targets, logits, lse, temp,
                                      momentum, update)
        grad_soft = None
        if soft_targets is not None and ctx.needs_input_grad[3]:
            grad_soft = _soft_grad(grad_loss, logits, lse).to(soft_targets.dtype)
        return (grad_inputs if ctx.needs_input_grad[0] else None), None, None, grad_soft, None, None, None, None, None


def _check_hyper(temp, momentum, update) -> tuple[float, float]:
    temp = number("temp", temp, positive=True)
    momentum = number("momentum", momentum, lower=0.0, upper=1.0, what=" (the weight kept by the old prototype)")
    if update not in MEMORY_UPDATE_MODES:
        raise ValueError(f"update must be one of {', '.join(repr(m) for m in MEMORY_UPDATE_MODES)}, got {update!r}")
    return temp, momentum


def _check_memory(memory: torch.Tensor, like_dtype: torch.dtype | None) -> None:
    if not isinstance(memory, torch.Tensor):
        raise TypeError(f"memory must be a torch.Tensor, got {type(memory).__name__}")
    if memory.dim() != 2:
        raise ValueError(f"memory must be 2-D (C, D), got shape {tuple(memory.shape)}")
    if memory.numel() == 0:
        raise ValueError(f"memory is empty (shape {tuple(memory.shape)}); it needs at least one prototype")
    allowed = (torch.float32, torch.float64) if like_dtype == torch.float64 else (torch.float32,)
    if memory.dtype not in allowed:
        raise MemoryDtypeError(f"memory must be float32 (float64 only with float64 inputs), got {memory.dtype}; "
                               "keep the buffer in float32 (memory.features = features.float())")
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous because it is updated in place; assign a contiguous copy "
                         "(memory = memory.contiguous()) before training")
    if memory.requires_grad:
        raise ValueError("memory must not require grad: it is a buffer updated in place during backward "
                         "(register it with register_buffer or detach it)")


def _check_targets(targets, batch: int, classes: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(f"targets must be (B,) = ({batch},) to match inputs, got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of labels, got {targets.dtype}")
    return targets.to(torch.int64).contiguous()  # the range is checked by the op (_checks)


def _check_soft(soft_targets, batch: int, classes: int) -> torch.Tensor:
    check_tensor("soft_targets", soft_targets, dims=(2,), dtypes=FLOAT_DTYPES)
    if tuple(soft_targets.shape) != (batch, classes):
        raise ValueError(f"soft_targets must be (B, C) = ({batch}, {classes}), got {tuple(soft_targets.shape)}")
    return soft_targets.contiguous()  # values (finite, distributions) are checked by the op (_checks)


def memory_contrastive(inputs: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, *, temp: float = 0.05,
                       momentum: float = 0.2, update: str = "sequential",
                       soft_targets: torch.Tensor | None = None) -> torch.Tensor:
    """Memory-bank contrastive loss; its backward updates ``memory`` in place.

    Args:
        inputs: (B, D) float32/bf16/fp16 (float64 for gradient checks) un-normalised features; they are
            L2-normalised inside (``F.normalize``).
        targets: (B,) integer labels in [0, C): the rows of ``memory`` that are positive and get updated.
        memory: (C, D) float32 contiguous buffer of L2-normalised prototypes, not requiring grad; mutated by the
            backward.
        temp: temperature > 0 of ``logits = x memory^T / temp``.
        momentum: μ in [0, 1) of ``m <- normalize(μ m + (1 - μ) x)``.
        update: "sequential" (cluster-contrast: every sample in batch order, repeated labels repeatedly), "hard"
            (cm_hard: per label the member least similar to its prototype), "mean" (per label one step towards the
            mean of its members) or "none".
        soft_targets: optional (B, C) distributions (rows sum to 1) replacing the one-hot of ``targets`` in the loss
            (MULT soft labels, OCLR sharpened targets); ``targets`` still choose the rows to update. Not detached:
            if it requires grad it receives ``-log softmax(logits) / B``.
    Returns:
        loss () float32 (float64 for float64 inputs): mean cross-entropy over the batch.

    The update runs only when backward runs (as in the community code): under ``no_grad`` nothing is updated.
    """
    check_tensor("inputs", inputs, dims=(2,), dtypes=FLOAT_DTYPES)
    _check_memory(memory, inputs.dtype)
    temp, momentum = _check_hyper(temp, momentum, update)
    batch, dim = inputs.shape
    classes = memory.shape[0]
    if memory.shape[1] != dim:
        raise ValueError(f"inputs (B, D) and memory (C, D) must share D, got {dim} and {memory.shape[1]}")
    check_same_device(inputs=inputs, targets=targets, memory=memory, soft_targets=soft_targets)
    targets = _check_targets(targets, batch, classes)
    if soft_targets is not None:
        soft_targets = _check_soft(soft_targets, batch, classes)
    inputs = inputs.contiguous()
    backend = _registry.choose_backend("memory_contrastive", inputs.device)
    if backend == _registry.dispatched_backend(inputs.device):
        # The op: traceable by torch.compile (also the reference, when it is the CPU kernel of the fallback).
        return torch.ops.vireid.memory_contrastive(inputs, targets, memory, soft_targets, temp, momentum, update)[0]
    if backend == "reference":
        forward, backward = memory_contrastive_ref, memory_contrastive_backward_ref
    else:  # Triton's interpreter on CPU tensors
        kernels = _registry.triton_module("memory_contrastive")
        forward, backward = kernels.launch, kernels.launch_backward
    return _EagerMemoryContrastive.apply(inputs, targets, memory, soft_targets, temp, momentum, update,
                                         _registry.checked("memory_contrastive", forward),
                                         _registry.checked("memory_contrastive_backward", backward))


def memory_update(features: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, *, momentum: float = 0.2,
                  update: str = "sequential", normalized: bool = False) -> None:
    """The momentum update alone, in place: ``m[y] <- normalize(μ m[y] + (1 - μ) x)`` per ``update`` mode.

    Args:
        features: (B, D) features; L2-normalised here unless ``normalized`` says they already are.
        targets: (B,) integer labels in [0, C).
        memory: (C, D) float32 contiguous buffer.
    """
    check_tensor("features", features, dims=(2,), dtypes=FLOAT_DTYPES)
    _check_memory(memory, features.dtype)
    _, momentum = _check_hyper(1.0, momentum, update)
    if memory.shape[1] != features.shape[1]:
        raise ValueError(f"features and memory must share D, got {features.shape[1]} and {memory.shape[1]}")
    check_same_device(features=features, targets=targets, memory=memory)
    targets = _check_targets(targets, features.shape[0], memory.shape[0])
    finite("features", features)
    with torch.no_grad():
        x = features.detach().to(memory.dtype)
        if not normalized:
            x = torch.nn.functional.normalize(x, dim=1)
        x = x.contiguous()
        backend = _registry.choose_backend("memory_contrastive", x.device)
        _registry.run("memory_update", backend, x.device, x, targets, memory, momentum, update)
