"""Per-token cross entropy in fp32 over a large vocabulary without full-size temporaries.

F.cross_entropy materialises log_softmax (batch x seq x vocab floats) in forward, and a zero-filled gradient
plus the log_softmax gradient in backward: three more tensors as large as the logits (412 MB each for 2048
tokens x 50304 entries), each freshly paged in by the OS. Here forward keeps one log-sum-exp per token and
backward writes softmax - one_hot straight into the one gradient tensor, walking the rows in slices that
stay in cache. Same fp32 arithmetic (max-shifted exponentials), so losses agree with F.cross_entropy to
rounding.
"""
from __future__ import annotations

import torch

_SLICE_BYTES = 2**21  # fp32 working set per slice of rows: well inside a core's L2


def _row_slices(rows: int, vocab: int) -> list[slice]:
    step = max(1, _SLICE_BYTES // (4 * vocab))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label] per row, in fp32: logits [N, V] (any float dtype), labels [N] -> [N]."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"token_cross_entropy expects logits [N, V] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenCrossEntropy.apply(logits, labels)
    return _log_sum_exp(logits) - logits.gather(1, labels[:, None]).squeeze(1).float()


def _log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    for part in _row_slices(rows, vocab):
        out[part] = torch.logsumexp(logits[part].float(), dim=-1)
    return out


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        lse = _log_sum_exp(logits)
        ctx.save_for_backward(logits, labels, lse)
        return lse - logits.gather(1, labels[:, None]).squeeze(1).float()

    @staticmethod
    def backward(ctx, grad_losses):
        logits, labels, lse = ctx.saved_tensors
        grad_losses = grad_losses.float()
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        in_place = grad.dtype == torch.float32
        for part in _row_slices(*logits.shape):
            # (softmax - one_hot) * g in fp32 whatever the logits' dtype, rounded once into grad
            g = grad_losses[part, None]
            probs = torch.sub(logits[part].float(), lse[part, None], out=grad[part] if in_place else None)
            probs.exp_().mul_(g).scatter_add_(1, labels[part, None], -g)
            if not in_place:
                grad[part] = probs
        return grad, None


def half_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp16_lm_cross_entropy: -log softmax(logits)[label] per row computed in the logits' own dtype (gpt-neox's
    fp16 path: max-shifted logits, exp, sum, log, all in half precision): logits [N, V], labels [N] -> [N]."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    target = shifted.gather(1, labels[:, None]).squeeze(1)
    return shifted.exp().sum(dim=-1).log() - target
