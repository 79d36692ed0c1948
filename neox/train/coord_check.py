"""muP's coordinate check: do activation sizes stay put as the model widens?

As gpt-neox runs it (megatron/training.py:mup_coord_check over mup.coord_check): models of hidden sizes
num_attention_heads x 2^2 .. 2^8, built once in muP and once in standard parametrisation (SP) from the same seed,
each trained for 3 steps on one fixed batch; at every forward (t = 1..4) the mean |x| of each module's output is
recorded. Under muP the curves over width are flat; under SP the later steps grow with width. The optimizer is the
configured one (muP's MuAdam / MuSGD learning rates for the muP models, plain for SP) at the peak lr.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch
from torch import nn

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model import GPTNeoX, causal_lm_loss
from neox.model.mup import MupSetup, widths_by_param
from neox.optim import build_optimizer, param_groups, set_lr

FIELDS = ("parametrization", "width", "module", "t", "l1")


def coord_check_widths(cfg: ModelConfig) -> list[int]:
    """gpt-neox's widths, num_attention_heads x 2^p for p = 2..8, without those that make no valid model (e.g. too
    few rotary dims per head)."""
    widths = []
    for p in range(2, 9):
        width = cfg.num_attention_heads * 2**p
        try:
            dataclasses.replace(cfg, hidden_size=width).validate()
        except ConfigError:
            continue
        widths.append(width)
    return widths


def _recorder(records: list[dict], parametrization: str, width: int, name: str, t: int):
    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            records.append({"parametrization": parametrization, "width": width, "module": name, "t": t,
                            "l1": float(output.detach().abs().float().mean())})
    return hook


def _optimizer(model: GPTNeoX, optimizer: dict, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    widths = widths_by_param(model)
    if widths is None and optimizer["type"].lower() == "sgd":
        # The standard side of a MuSGD run: torch's SGD, which `sgd` means only with muP's scaling in training.
        groups = param_groups(model.named_parameters(), weight_decay)
        return torch.optim.SGD(groups, weight_decay=weight_decay, **optimizer["params"])
    return build_optimizer(model, optimizer["type"], optimizer["params"], weight_decay, device.type,
                           mup_widths=widths)


def coord_data(cfg: ModelConfig, mup: MupSetup | None, widths: list[int], batch: dict[str, torch.Tensor],
               optimizer: dict, weight_decay: float, *, seed: int, steps: int = 3,
               device: torch.device | str = "cpu") -> list[dict]:
    """Rows (parametrization, width, module, t, l1): `steps` optimizer steps per width, t = 1 .. steps + 1.

    mup None: standard parametrisation. optimizer: the config's {type, params} (params.lr is used constantly)."""
    name = "mup" if mup is not None else "sp"
    device = torch.device(device)
    tokens, position_ids = batch["tokens"].to(device), batch["position_ids"].to(device)
    labels, loss_mask = batch["labels"].to(device), batch["loss_mask"].to(device)
    records: list[dict] = []
    for width in widths:
        torch.manual_seed(seed)
        model = GPTNeoX(dataclasses.replace(cfg, hidden_size=width), mup).to(device).train()
        opt = _optimizer(model, optimizer, weight_decay, device)
        set_lr(opt, float(optimizer["params"]["lr"]))
        for t in range(1, steps + 2):
            # prepend: see each module's own output, before muP's readout multiplier (a hook on the final norm).
            handles = [m.register_forward_hook(_recorder(records, name, width, n, t), prepend=True)
                       for n, m in model.named_modules() if n]
            try:
                loss = causal_lm_loss(model(tokens, position_ids=position_ids), labels, loss_mask)
            finally:
                for handle in handles:
                    handle.remove()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del model, opt
    return records


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(records)
    return path


def plot(path: Path, records: list[dict], title: str) -> Path:
    """One panel per step t: mean |output| over width (log-log), a line per module, as mup's plot_coord_data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["t"] for r in records})
    modules = list(dict.fromkeys(r["module"] for r in records))
    fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 4), squeeze=False)
    for ax, t in zip(axes[0], steps):
        for module in modules:
            points = sorted((r["width"], r["l1"]) for r in records if r["t"] == t and r["module"] == module)
            ax.plot([w for w, _ in points], [v for _, v in points], marker=".", linewidth=1, label=module)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (hidden_size)")
        ax.set_title(f"t={t}")
    axes[0][0].set_ylabel("mean |activation|")
    fig.suptitle(title)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", dpi=80)
    plt.close(fig)
    return path
