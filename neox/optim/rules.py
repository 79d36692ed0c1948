"""Update rules gpt-neox offers that torch does not: Lion, SM3, MADGRAD (decoupled weight decay) and Adam without
bias correction (FusedAdam's bias_correction: false).

Each follows its paper; where gpt-neox's implementation (megatron/optimizers.py) fixes a detail the paper leaves
open, the same choice is made here so a gpt-neox run and ours take the same steps -- the comments say which.
Dense gradients only: the models here never produce sparse ones.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


def _dense_grads(group: dict) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported by this optimizer")
        yield p, p.grad


def _closure_loss(closure: Callable | None):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Lion(Optimizer):
    """Lion (Chen et al. 2023, arXiv:2302.06675, Algorithm 2), with decoupled weight decay.

    update = sign(beta1 * m + (1 - beta1) * g); p <- p * (1 - lr * wd) - lr * update; m <- beta2 * m + (1 - beta2) * g.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1], got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p, grad in _dense_grads(group):
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1.0 - lr * wd)
                p.add_(torch.lerp(grad, exp_avg, beta1).sign_(), alpha=-lr)
                exp_avg.lerp_(grad, 1.0 - beta2)
        return loss


class SM3(Optimizer):
    """SM3-II (Anil et al. 2019, arXiv:1901.11150): Adagrad with one accumulator per tensor dimension.

    For a tensor of shape (n1, ..., nr), accumulator i has shape n_i (broadcast along the other dims).
    nu = min_i acc_i (broadcast), then nu <- beta * nu + (1 - beta) * g^2 (beta 0: nu + g^2, the paper's rule);
    acc_i <- max over every dim but i of nu (with beta > 0: the running max of that); update = g / sqrt(nu + eps);
    with momentum: update <- (1 - momentum) * update + momentum * previous update; p <- p - lr * update.
    SM3 has no weight decay (gpt-neox passes it none either).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, beta: float = 0.0, eps: float = 1e-30):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, beta=beta, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            momentum, beta, eps = group["momentum"], group["beta"], group["eps"]
            for p, grad in _dense_grads(group):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["accumulators"] = _sm3_accumulators(grad)
                    if momentum > 0.0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                accs = state["accumulators"]
                nu = accs[0]
                for acc in accs[1:]:
                    nu = torch.minimum(nu, acc)  # broadcasts to the full shape
                nu = nu * beta if beta > 0.0 else nu.clone()
                nu = nu.expand_as(grad).clone() if nu.shape != grad.shape else nu
                nu.addcmul_(grad, grad, value=1.0 - beta)
                for dim, acc in enumerate(accs):
                    reduced = _max_over_other_dims(nu, dim)
                    if beta > 0.0:
                        torch.maximum(acc, reduced, out=acc)
                    else:
                        acc.copy_(reduced)  # nu already holds acc + g^2 >= acc
                update = nu.add_(eps).rsqrt_().mul_(grad)
                if momentum > 0.0:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(update, alpha=1.0 - momentum)
                    update = buf
                p.sub_(update, alpha=group["lr"])
                state["step"] += 1
        return loss


def _sm3_accumulators(grad: torch.Tensor) -> list[torch.Tensor]:
    if grad.ndim <= 1:
        return [torch.zeros_like(grad)]
    return [torch.zeros([n if d == i else 1 for d, n in enumerate(grad.shape)], dtype=grad.dtype, device=grad.device)
            for i in range(grad.ndim)]


def _max_over_other_dims(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    if tensor.ndim <= 1:
        return tensor
    others = [d for d in range(tensor.ndim) if d != dim]
    return torch.amax(tensor, dim=others, keepdim=True)


class MadgradWD(Optimizer):
    """MADGRAD (Defazio & Jelassi 2021, arXiv:2101.11075, Algorithm 1) with AdamW-style decoupled weight decay.

    With step k = 0, 1, ... and lambda_k = lr * sqrt(k + 1):
      p <- p * (1 - lr * wd)                 (decoupled decay, gpt-neox's madgrad_wd change to the paper)
      s <- s + lambda_k * g;  nu <- nu + lambda_k * g^2
      z = x0 - s / (nu^(1/3) + eps)
      momentum 0: p <- z, with x0 recovered from the current p as p + s_prev / (nu_prev^(1/3) + eps);
      else:       p <- (1 - c) * p + c * z with c = 1 - momentum and x0 the initial point.
    As the reference implementation (Facebook's, which gpt-neox ships), "lr" in all of the above is lr + eps, and
    the step counter is shared by all parameter groups.
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-6):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps))
        self.steps_taken = 0

    def state_dict(self):
        state = super().state_dict()
        state["steps_taken"] = self.steps_taken
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps_taken = int(state_dict.pop("steps_taken", 0))
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = _closure_loss(closure)
        k = self.steps_taken
        for group in self.param_groups:
            eps, momentum, decay = group["eps"], group["momentum"], group["weight_decay"]
            lr = group["lr"] + eps
            lamb = lr * math.sqrt(k + 1)
            c = 1.0 - momentum
            for p, grad in _dense_grads(group):
                state = self.state[p]
                if not state:
                    state["grad_sum_sq"] = torch.zeros_like(p)
                    state["s"] = torch.zeros_like(p)
                    if momentum != 0.0:
                        state["x0"] = p.detach().clone()
                grad_sum_sq, s = state["grad_sum_sq"], state["s"]
                if decay:
                    p.mul_(1.0 - lr * decay)
                if momentum == 0.0:
                    x0 = p.addcdiv(s, grad_sum_sq.pow(1.0 / 3.0).add_(eps))
                else:
                    x0 = state["x0"]
                grad_sum_sq.addcmul_(grad, grad, value=lamb)
                s.add_(grad, alpha=lamb)
                z = x0.addcdiv(s, grad_sum_sq.pow(1.0 / 3.0).add_(eps), value=-1.0)
                if momentum == 0.0:
                    p.copy_(z)
                else:
                    p.mul_(1.0 - c).add_(z, alpha=c)
        self.steps_taken += 1
        return loss


class UncorrectedAdam(Optimizer):
    """Adam without bias correction (FusedAdam's bias_correction: false):
    m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; p <- p - lr * m / (sqrt(v) + eps),
    with weight decay decoupled (adam_w_mode, p <- p * (1 - lr * wd) first) or added to the gradient (L2)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, adam_w_mode: bool = True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      adam_w_mode=adam_w_mode))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p, grad in _dense_grads(group):
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                if wd and group["adam_w_mode"]:
                    p.mul_(1.0 - lr * wd)
                elif wd:
                    grad = grad.add(p, alpha=wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)
        return loss
