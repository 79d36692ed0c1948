"""Layout-free training state files: merging (stage, tp rank) files back into the single-device state."""
from __future__ import annotations

import torch
import pytest

from neox.checkpoint.layout_state import FORMAT, LayoutStateError, consolidated_weights, read_layout_free_state
from neox.model import GPTNeoX
from neox.parallel.sharding import shard_state_dict
from tests.distributed import tp_checks


def _write_layout(ckpt_dir, full: dict, moments: dict, stages: list[list[str]], tp: int) -> None:
    (ckpt_dir / "layout_free").mkdir(parents=True)
    for stage, names in enumerate(stages):
        for rank in range(tp):
            payload = {
                "format": FORMAT, "tp_rank": rank, "tp_size": tp, "pp_rank": stage, "pp_size": len(stages),
                "step": 7.0, "client_state": {"iteration": 7, "consumed_train_samples": 56, "evaluations_done": 0},
                "weights": shard_state_dict({n: full[n] for n in names}, rank, tp),
                "moments": {k: shard_state_dict({n: m[n] for n in names}, rank, tp) for k, m in moments.items()},
            }
            torch.save(payload, ckpt_dir / "layout_free" / f"pp{stage:02d}-tp{rank:02d}.pt")


def test_tp2_pp2_files_merge_into_the_single_device_state(tmp_path):
    torch.manual_seed(0)
    model = GPTNeoX(tp_checks.model_cfg(num_kv_heads=2, activation="swiglu"))
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {"exp_avg": {n: torch.randn_like(t) for n, t in full.items()},
               "exp_avg_sq": {n: torch.rand_like(t) for n, t in full.items()}}
    names = list(full)
    first_stage = [n for n in names if n.startswith(("embedding.", "blocks.0."))]
    _write_layout(tmp_path, full, moments, [first_stage, [n for n in names if n not in first_stage]], tp=2)

    state = read_layout_free_state(tmp_path)
    assert state.step == 7.0 and state.client_state["iteration"] == 7
    for name, tensor in full.items():
        assert torch.equal(state.weights[name], tensor), name
        for key in moments:
            assert torch.equal(state.moments[key][name], moments[key][name]), (key, name)
    weights = consolidated_weights(tmp_path, tied_head=True)
    assert sorted(weights) == sorted(model.state_dict())


def test_missing_or_partial_state_is_a_clear_error(tmp_path):
    with pytest.raises(LayoutStateError, match="no layout_free/ files"):
        read_layout_free_state(tmp_path)
    torch.manual_seed(0)
    full = {n: p.detach().clone() for n, p in GPTNeoX(tp_checks.model_cfg()).named_parameters()}
    _write_layout(tmp_path, full, {}, [list(full)], tp=2)
    (tmp_path / "layout_free" / "pp00-tp01.pt").unlink()
    with pytest.raises(LayoutStateError, match="pp00-tp01.pt"):
        read_layout_free_state(tmp_path)
