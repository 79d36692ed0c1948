"""Fused query_key_value output -> head-major q, k, v with rotary applied, in one pass and one autograd node.

Slicing q/k/v as views of the fused projection and rotating a partial slice with torch.cat costs, per layer
and step, a concatenated copy of q and k plus, in backward, one full-size zero-filled gradient per view that
autograd then sums. Here forward writes q [b, heads, s, d] and k, v [b, kv_heads, s, d] as contiguous
tensors (what SDPA reads fastest) straight from the fused layout, rotating the first rotary_ndims of each q/k
head on the way; backward writes the one gradient of the fused tensor in place, rotating back (the
transpose of a rotation is the rotation by the opposite angle).

Rotation ("rotate half", as GPT-NeoX / Llama / Hugging Face): for x = (x1, x2, rest), x1 and x2 the two
halves of the rotary dims, y = (x1 cos - x2 sin, x2 cos + x1 sin, rest).
"""
from __future__ import annotations

import torch


def _rotate_into(out: torch.Tensor, src: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 rotary_ndims: int, direction: float) -> None:
    """out = src with its first rotary_ndims rotated by +angle (direction 1) or -angle (direction -1).

    cos/sin hold one value per rotary pair (rotary_ndims // 2) and broadcast against src[..., :half].
    """
    half = rotary_ndims // 2
    if rotary_ndims:
        x1, x2 = src[..., :half], src[..., half:rotary_ndims]
        out1, out2 = out[..., :half], out[..., half:rotary_ndims]
        # Products rounded before the sum (no addcmul: it may fuse into an FMA), as HF's x*cos + rotate_half(x)*sin
        # computes them: the same fp32 bits, so imported models give HF's logits exactly.
        product = torch.mul(x2, sin)
        torch.mul(x1, cos, out=out1)
        out1.sub_(product) if direction > 0 else out1.add_(product)
        torch.mul(x1, sin, out=product)
        torch.mul(x2, cos, out=out2)
        out2.add_(product) if direction > 0 else out2.sub_(product)
    if rotary_ndims < src.shape[-1]:
        out[..., rotary_ndims:].copy_(src[..., rotary_ndims:])


def _fused_view(qkv: torch.Tensor, kv_heads: int, group_size: int, head_dim: int) -> torch.Tensor:
    b, s, _ = qkv.shape
    return qkv.view(b, s, kv_heads, group_size + 2, head_dim)


def split_heads(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, kv_heads: int,
                group_size: int, head_dim: int, rotary_ndims: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [b, s, kv_heads * (group_size + 2) * head_dim] in the fused per-group layout (model.py) ->
    q [b, kv_heads * group_size, s, d], k and v [b, kv_heads, s, d], all contiguous.

    cos/sin: [1 or b, s, rotary_ndims // 2] (None without rotary). Differentiable in qkv.
    """
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _SplitHeads.apply(qkv, cos, sin, kv_heads, group_size, head_dim, rotary_ndims)
    return _split_no_grad(qkv, cos, sin, kv_heads, group_size, head_dim, rotary_ndims)


def _split_no_grad(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, kv_heads: int,
                   group_size: int, head_dim: int, rotary_ndims: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Without autograd (decoding, eval): rotate q and k in place in the projection's own output (they are
    adjacent in each group: one set of ops for both), then hand out views. A decoding step (one position)
    keeps the views: copying a token's heads costs more dispatch than SDPA gains from contiguity."""
    fused = _fused_view(qkv, kv_heads, group_size, head_dim)
    b, s = fused.shape[:2]
    g = group_size
    if rotary_ndims:
        half = rotary_ndims // 2
        qk = fused[:, :, :, : g + 1]
        x1, x2 = qk[..., :half], qk[..., half:rotary_ndims]
        c, sn = cos[:, :, None, None], sin[:, :, None, None]  # [1|b, s, 1, 1, half]
        first, product = x1 * c, x2 * sn  # the arithmetic of _rotate_into, in place
        first.sub_(product)
        torch.mul(x1, sn, out=product)
        x2.mul_(c).add_(product)
        x1.copy_(first)
    q = fused[:, :, :, :g].permute(0, 2, 3, 1, 4).reshape(b, kv_heads * g, s, head_dim)
    k, v = fused[:, :, :, g].transpose(1, 2), fused[:, :, :, g + 1].transpose(1, 2)
    if s == 1:
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _split(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, kv_heads: int,
           group_size: int, head_dim: int, rotary_ndims: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = _fused_view(qkv, kv_heads, group_size, head_dim)
    b, s = fused.shape[:2]
    g = group_size
    q = qkv.new_empty((b, kv_heads, g, s, head_dim))
    k = qkv.new_empty((b, kv_heads, s, head_dim))
    v = qkv.new_empty((b, kv_heads, s, head_dim))
    q_cos = q_sin = k_cos = k_sin = None
    if rotary_ndims:
        q_cos, q_sin = cos[:, None, None], sin[:, None, None]  # [1|b, 1, 1, s, half]
        k_cos, k_sin = cos[:, None], sin[:, None]  # [1|b, 1, s, half]
    _rotate_into(q, fused[:, :, :, :g].permute(0, 2, 3, 1, 4), q_cos, q_sin, rotary_ndims, 1.0)
    _rotate_into(k, fused[:, :, :, g].transpose(1, 2), k_cos, k_sin, rotary_ndims, 1.0)
    v.copy_(fused[:, :, :, g + 1].transpose(1, 2))
    return q.view(b, kv_heads * g, s, head_dim), k, v


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, kv_heads, group_size, head_dim, rotary_ndims):
        ctx.layout = (qkv.shape, kv_heads, group_size, head_dim, rotary_ndims)
        ctx.save_for_backward(cos, sin)
        return _split(qkv, cos, sin, kv_heads, group_size, head_dim, rotary_ndims)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        shape, kv_heads, g, head_dim, rotary_ndims = ctx.layout
        cos, sin = ctx.saved_tensors
        grad = grad_q.new_empty(shape)
        fused = _fused_view(grad, kv_heads, g, head_dim)
        q_cos = q_sin = k_cos = k_sin = None
        if rotary_ndims:
            q_cos, q_sin = cos[:, None, None], sin[:, None, None]
            k_cos, k_sin = cos[:, None], sin[:, None]
        _rotate_into(fused[:, :, :, :g].permute(0, 2, 3, 1, 4), grad_q.unflatten(1, (kv_heads, g)),
                     q_cos, q_sin, rotary_ndims, -1.0)
        _rotate_into(fused[:, :, :, g].transpose(1, 2), grad_k, k_cos, k_sin, rotary_ndims, -1.0)
        fused[:, :, :, g + 1].transpose(1, 2).copy_(grad_v)
        return grad, None, None, None, None, None, None
