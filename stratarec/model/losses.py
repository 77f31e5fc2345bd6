"""Full-softmax cross-entropy over the catalogue without materialising the logits.

``F.cross_entropy(hidden @ items.T, targets)`` on a CPU spends most of a training step
outside the matrix products: it writes an (N, n_items) logits tensor (350 MB for one ML-1M
batch of 128 x 200 positions), then log-softmax and its backward stream it through memory
again. Here the rows go through in chunks small enough to stay in cache: each chunk's
logits are computed, turned into softmax probabilities in place, and both gradients
(``dL/dhidden = (P - Y) W`` and ``dL/dW = (P - Y)^T H``) are accumulated right away. The
loss is a scalar, so backward only rescales the stored gradients. Same loss and gradients
as the reference (to float rounding, checked in the unit tests), ~2.5x less time per step
on this machine's CPU.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, low_precision: bool):  # noqa: D102
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # bf16 products (fp32 accumulation inside the kernel) on CPUs with native bf16: the
        # mixed-precision counterpart of CUDA autocast. Softmax and sums stay in fp32.
        mm_dtype = torch.bfloat16 if low_precision else torch.float32
        w = weight.detach().to(mm_dtype)
        h_all = hidden.detach()
        for start in range(0, n, chunk_size):
            h = h_all[start : start + chunk_size].to(mm_dtype)
            t = targets[start : start + chunk_size]
            rows = torch.arange(len(t), device=hidden.device)
            probs = torch.softmax((h @ w.T).float(), dim=1)
            total -= torch.log(probs[rows, t].clamp_min(1e-38)).sum()
            probs[rows, t] -= 1.0  # now dL_i/dlogits_i = softmax - onehot
            p = probs.to(mm_dtype)
            grad_hidden[start : start + chunk_size] = (p @ w).float()
            grad_weight += (p.T @ h).float()
        ctx.save_for_backward(grad_hidden.div_(n).to(hidden.dtype), grad_weight.div_(n).to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, low_precision: bool = False
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(hidden @ weight.T)`` against ``targets``.

    Args:
        hidden: (N, d) states, one per scored position.
        weight: (n_classes, d) output rows (the tied item table).
        targets: (N,) class indices in ``[0, n_classes)``.
        chunk_size: Rows per chunk; ~1,000 keeps a chunk's logits in a CPU's cache.
        low_precision: Run the three products in bf16 (CPUs with AVX512-BF16 or AMX).

    Returns:
        The scalar loss, differentiable with respect to ``hidden`` and ``weight``.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, d) and weight (C, d) must share d, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one row")
    return _LinearCrossEntropy.apply(hidden, weight, targets, int(chunk_size), bool(low_precision))


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
