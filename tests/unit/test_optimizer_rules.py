"""Each optimizer gpt-neox offers, checked step by step against the update rule written out by hand here
(from the papers, with gpt-neox's choices where its implementation fixes a detail), and build_optimizer's
choice of class and weight-decay handling for every type."""
import math

import numpy as np
import pytest
import torch

from neox.optim import OptimizerError, build_optimizer
from neox.optim.rules import SM3, Lion, MadgradWD, UncorrectedAdam

GRADS = [np.array([[0.5, -1.0, 2.0], [0.25, 3.0, -0.5]]), np.array([[-1.5, 0.5, 1.0], [2.0, -0.25, 0.75]]),
         np.array([[0.1, 0.2, -0.3], [-2.0, 1.0, 0.5]])]
P0 = np.array([[1.0, -2.0, 0.5], [0.3, 0.7, -1.2]])


def run(optimizer_cls, steps=3, **kwargs):
    p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float64))
    opt = optimizer_cls([p], **kwargs)
    for g in GRADS[:steps]:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


def test_lion_matches_the_paper_with_decoupled_decay():
    lr, (b1, b2), wd = 0.01, (0.9, 0.99), 0.1
    p, m = P0.copy(), np.zeros_like(P0)
    for g in GRADS:
        p = p * (1 - lr * wd) - lr * np.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    np.testing.assert_allclose(run(Lion, lr=lr, betas=(b1, b2), weight_decay=wd), p, rtol=0, atol=1e-15)


@pytest.mark.parametrize("beta,momentum", [(0.0, 0.0), (0.9, 0.3)])
def test_sm3_keeps_one_accumulator_per_row_and_per_column(beta, momentum):
    lr, eps = 0.1, 1e-30
    p = P0.copy()
    rows, cols = np.zeros(2), np.zeros(3)
    prev = np.zeros_like(P0)
    for g in GRADS:
        nu = np.empty_like(p)
        for i in range(2):
            for j in range(3):
                base = min(rows[i], cols[j])
                nu[i, j] = (beta * base + (1 - beta) * g[i, j] ** 2) if beta else base + g[i, j] ** 2
        new_rows, new_cols = nu.max(axis=1), nu.max(axis=0)
        rows = np.maximum(rows, new_rows) if beta else new_rows
        cols = np.maximum(cols, new_cols) if beta else new_cols
        update = g / np.sqrt(nu + eps)
        if momentum:
            update = (1 - momentum) * update + momentum * prev
            prev = update
        p = p - lr * update
    np.testing.assert_allclose(run(SM3, lr=lr, momentum=momentum, beta=beta, eps=eps), p, rtol=1e-13)


def test_sm3_vector_and_scalar_parameters_are_plain_adagrad():
    v = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    s = torch.nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
    opt = SM3([v, s], lr=0.5)
    sums_v, sums_s = np.zeros(2), 0.0
    expect_v, expect_s = np.array([1.0, 2.0]), 3.0
    for gv, gs in [([1.0, -2.0], 0.5), ([0.5, 1.0], -1.0)]:
        v.grad, s.grad = torch.tensor(gv, dtype=torch.float64), torch.tensor(gs, dtype=torch.float64)
        opt.step()
        sums_v, sums_s = sums_v + np.square(gv), sums_s + gs ** 2
        expect_v = expect_v - 0.5 * np.array(gv) / np.sqrt(sums_v + 1e-30)
        expect_s = expect_s - 0.5 * gs / math.sqrt(sums_s + 1e-30)
    np.testing.assert_allclose(v.detach().numpy(), expect_v, rtol=1e-14)
    assert s.item() == pytest.approx(expect_s, rel=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_madgrad_wd_is_dual_averaging_with_cube_root_scaling(momentum):
    lr, eps, wd = 0.01, 1e-6, 0.1
    step_lr = lr + eps  # the reference implementation's (and gpt-neox's) effective learning rate
    p, s, nu, x0 = P0.copy(), np.zeros_like(P0), np.zeros_like(P0), P0.copy()
    for k, g in enumerate(GRADS):
        lamb = step_lr * math.sqrt(k + 1)
        p = p * (1 - step_lr * wd)
        if momentum == 0:
            x0 = p + s / (np.cbrt(nu) + eps)
        s, nu = s + lamb * g, nu + lamb * g * g
        z = x0 - s / (np.cbrt(nu) + eps)
        p = z if momentum == 0 else momentum * p + (1 - momentum) * z
    got = run(MadgradWD, lr=lr, momentum=momentum, weight_decay=wd, eps=eps)
    np.testing.assert_allclose(got, p, rtol=1e-12)


def test_madgrad_wd_step_count_survives_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.tensor(P0))
    opt = MadgradWD([p], lr=0.01)
    p.grad = torch.ones_like(p)
    opt.step()
    fresh = MadgradWD([p], lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.steps_taken == 1


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_uncorrected_adam_has_no_bias_correction(adam_w_mode):
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    p, m, v = P0.copy(), np.zeros_like(P0), np.zeros_like(P0)
    for g in GRADS:
        if adam_w_mode:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * m / (np.sqrt(v) + eps)
    got = run(UncorrectedAdam, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, adam_w_mode=adam_w_mode)
    np.testing.assert_allclose(got, p, rtol=1e-12)


# ---------------------------------------------------------------- build_optimizer: class and weight decay

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)  # weight decays, bias does not


def one_step(kind, params, weight_decay=0.1, **kwargs):
    torch.manual_seed(0)
    model = Tiny().double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, kind, params, weight_decay, "cpu", **kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, start, dict(model.named_parameters())


def test_adam_is_adamw_with_decoupled_decay_on_matrices_only():
    opt, start, after = one_step("Adam", {"lr": 0.01})
    assert type(opt) is torch.optim.AdamW
    # first Adam step moves every entry by lr (m/sqrt(v) = 1); decay multiplies the weight by 1 - lr * wd first
    torch.testing.assert_close(after["linear.weight"], start["linear.weight"] * (1 - 0.01 * 0.1) - 0.01)
    torch.testing.assert_close(after["linear.bias"], start["linear.bias"] - 0.01)


def test_adam_w_mode_false_and_cpu_torch_adam_add_decay_to_the_gradient():
    for kind, params in [("adam", {"lr": 0.01, "adam_w_mode": False}), ("cpu_torch_adam", {"lr": 0.01})]:
        opt, start, after = one_step(kind, params)
        assert type(opt) is torch.optim.Adam
        # L2: the decayed gradient 1 + wd * w is still positive, so the first step is -lr on every entry
        torch.testing.assert_close(after["linear.weight"], start["linear.weight"] - 0.01)
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_each_type_builds_its_class():
    assert type(one_step("LION", {"lr": 0.01})[0]) is Lion
    assert type(one_step("madgrad_wd", {"lr": 0.01})[0]) is MadgradWD
    assert type(one_step("adam", {"lr": 0.01, "bias_correction": False})[0]) is UncorrectedAdam
    opt, start, after = one_step("sm3", {"lr": 0.1})
    assert type(opt) is SM3 and "weight_decay" not in opt.defaults  # SM3 takes no decay, as in gpt-neox
    torch.testing.assert_close(after["linear.weight"], start["linear.weight"] - 0.1)


def test_sgd_is_mupsgd_only():
    with pytest.raises(OptimizerError, match="sgd is gpt-neox's MuSGD .* needs use_mup: true"):
        one_step("sgd", {"lr": 0.01})


def test_bnb_and_unknown_params_are_refused():
    with pytest.raises(OptimizerError, match="bitsandbytes' 8-bit Adam runs on CUDA only"):
        one_step("adam", {"lr": 0.01}, use_bnb_optimizer=True)
    with pytest.raises(OptimizerError, match=r"\['eps'\] are not options of lion"):
        one_step("lion", {"lr": 0.01, "eps": 1e-8})
    with pytest.raises(OptimizerError, match="onebitadam"):
        one_step("onebitadam", {"lr": 0.01})


@pytest.mark.slow  # DeepSpeed builds its cpu_adam C++ op the first time (about 40 s; cached afterwards)
def test_cpu_adam_is_deepspeeds_cpu_adam_and_steps_like_adamw():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8}
    torch.manual_seed(0)
    model, reference = Tiny(), Tiny()
    reference.load_state_dict(model.state_dict())
    opt = build_optimizer(model, "CPU_Adam", params, 0.1, "cpu")
    ref = build_optimizer(reference, "adam", params, 0.1, "cpu")
    assert type(opt) is DeepSpeedCPUAdam
    for step in range(3):
        for m in (model, reference):
            for i, p in enumerate(m.parameters()):
                p.grad = torch.full_like(p, 0.5 * (step + 1) * (-1) ** i)
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
