"""Layout-free training state files, in one process: the grid geometry, the shard file format (written and read a
piece at a time, bytes counted), the index that any layout reads its own ranges from, and the previous format
(pp{S}-tp{T}.pt files), which still loads."""
from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors import safe_open

from neox.checkpoint import shard_files
from neox.checkpoint.layout_engine import MOMENTS, WEIGHT, FlatRange
from neox.checkpoint.layout_sources import LEGACY_FORMAT, LayoutStateError, fill, open_source
from neox.checkpoint.layout_state import OfflineWriter, StageShard, consolidated_weights, read_layout_free_state
from neox.checkpoint.regions import Rect, flat_range_rects, grid_shape, tp_band
from neox.checkpoint.shard_files import Entry, IOStats, ShardFile, write_shard_file
from neox.model import GPTNeoX
from neox.parallel.sharding import shard_state_dict, shard_tensor
from tests.distributed import tp_checks


@pytest.fixture(scope="module")
def model_state():
    torch.manual_seed(0)
    model = GPTNeoX(tp_checks.model_cfg(num_kv_heads=2, activation="swiglu"))
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {"exp_avg": {n: torch.randn_like(t) for n, t in full.items()},
               "exp_avg_sq": {n: torch.rand_like(t) for n, t in full.items()}}
    names = list(full)
    first_stage = [n for n in names if n.startswith(("embedding.", "blocks.0."))]
    stages = [first_stage, [n for n in names if n not in first_stage]]
    return model, full, moments, stages


# --------------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("shape,dim,tp", [((12, 8), 0, 2), ((12, 8), 1, 4), ((6, 4, 5), 1, 2), ((10,), 0, 2),
                                          ((7, 3), None, 2), ((), None, 1)])
def test_flat_ranges_of_a_tp_shard_are_rectangles_of_the_single_device_grid(shape, dim, tp):
    """Every element of a flat range of any tp shard lands where shard_tensor took it from, exactly once."""
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    grid = full.reshape(grid_shape(shape))
    name = "blocks.0.mlp.linear1.weight" if dim == 0 else "blocks.0.mlp.linear2.weight" if dim == 1 else "x.bias"
    rng = random.Random(0)
    for rank in range(tp):
        band = tp_band(shape, dim, rank, tp)
        shard = shard_tensor(name, full, rank, tp, {name: dim}).reshape(-1) if dim is not None else full.reshape(-1)
        assert band.numel == shard.numel()
        for _ in range(20):
            a = rng.randrange(0, band.numel + 1)
            b = rng.randrange(a, band.numel + 1)
            got = torch.cat([grid[r.r0:r.r1, r.c0:r.c1].reshape(-1) for r, _ in flat_range_rects(band, a, b)]
                            or [torch.empty(0)])
            assert torch.equal(got, shard[a:b]), (rank, a, b)
            offsets = [off for _, off in flat_range_rects(band, a, b)]
            assert offsets == sorted(offsets) and len(offsets) <= 3


# --------------------------------------------------------------------------------------------- shard files

def test_shard_file_is_safetensors_and_reads_exactly_the_bytes_asked_for(tmp_path):
    torch.manual_seed(1)
    a, b = torch.randn(5, 7), torch.randn(3, 4)
    stats = IOStats()
    path = tmp_path / "rank00000.safetensors"
    size = write_shard_file(path, [Entry("weight/a@0,0", 5, 7, a.reshape(-1)),
                                   Entry("weight/b@2,3", 3, 4, b.t().contiguous().t().reshape(-1))],
                            {"format": "x"}, stats)
    assert size == path.stat().st_size == stats.bytes_written
    with safe_open(str(path), framework="pt") as f:  # the format a user's tools read
        assert torch.equal(f.get_tensor("weight/a@0,0"), a) and torch.equal(f.get_tensor("weight/b@2,3"), b)
        assert f.metadata() == {"format": "x"}
    reads = IOStats()
    shard = ShardFile(path, reads)
    header = reads.bytes_read
    dest = torch.zeros(4, 9)
    shard.read_into("weight/a@0,0", (1, 4), (2, 6), dest[:3, 5:9])  # strided rows of a bigger tensor
    assert torch.equal(dest[:3, 5:9], a[1:4, 2:6]) and not dest[3:].any() and not dest[:, :5].any()
    assert reads.bytes_read - header == 3 * 4 * 4
    whole = torch.empty(3, 7, dtype=torch.bfloat16)  # another dtype: through the bounded staging buffer
    shard.read_into("weight/a@0,0", (2, 5), (0, 7), whole)
    assert torch.equal(whole, a[2:5].to(torch.bfloat16)) and reads.read_calls >= 4
    shard.close()
    path.write_bytes(path.read_bytes()[:-10])  # cut off
    with pytest.raises(shard_files.ShardFileError, match="cut off"):
        ShardFile(path, IOStats())


def test_staging_buffer_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_files, "BUFFER_BYTES", 64)
    values = torch.randn(100)
    stats = IOStats()
    write_shard_file(tmp_path / "f.safetensors", [Entry("w/x@0,0", 10, 10, values.to(torch.float64))], {}, stats)
    assert 0 < stats.staging_peak <= 64
    dest = torch.empty(10, 10, dtype=torch.float64)
    ShardFile(tmp_path / "f.safetensors", stats).read_into("w/x@0,0", (0, 10), (0, 10), dest)
    assert torch.equal(dest.float().reshape(-1), values) and stats.staging_peak <= 64


# --------------------------------------------------------------------------------------------- the index

def _write_offline(ckpt_dir, full, moments, stages, tp):
    writer = OfflineWriter(ckpt_dir)
    for stage, names in enumerate(stages):
        for rank in range(tp):
            writer.add(StageShard(stage, len(stages), rank, tp), 7.0,
                       {"iteration": 7, "consumed_train_samples": 56, "evaluations_done": 0},
                       shard_state_dict({n: full[n] for n in names}, rank, tp),
                       {k: shard_state_dict({n: m[n] for n in names}, rank, tp) for k, m in moments.items()})
    writer.finish({"tp": tp, "pp": len(stages), "dp": 1})


def _assert_reads_back(ckpt_dir, full: dict, moments: dict) -> None:
    """The whole single-device state, step and client state, as written."""
    state = read_layout_free_state(ckpt_dir)
    assert state.step == 7.0 and state.client_state["iteration"] == 7
    for name, tensor in full.items():
        assert torch.equal(state.weights[name], tensor), name
        for key in moments:
            assert torch.equal(state.moments[key][name], moments[key][name]), (key, name)


def test_another_layout_reads_only_its_own_ranges(tmp_path, model_state):
    """Written as tp2 x pp2 shards; a tp1 rank's ZeRO-style flat range, which cuts across the tp2 shards of the
    column-split matrices, is read back exactly, with the bytes counted."""
    _, full, moments, stages = model_state
    _write_offline(tmp_path, full, moments, stages, tp=2)
    _assert_reads_back(tmp_path, full, moments)

    stats = IOStats()
    source = open_source(tmp_path, stats)
    index_bytes = stats.bytes_read
    ranges, expected = [], []
    for name, tensor in full.items():
        band = tp_band(tuple(tensor.shape), None, 0, 1)
        start, stop = band.numel // 3, band.numel - band.numel // 5  # a ZeRO-like flat partition across tp shards
        views = {k: torch.zeros(stop - start) for k in (WEIGHT, *MOMENTS)}
        ranges.append(FlatRange(name, tuple(tensor.shape), band, start, stop, views))
        expected.append((views, {WEIGHT: tensor.reshape(-1)[start:stop],
                                 **{k: moments[k][name].reshape(-1)[start:stop] for k in MOMENTS}}))
    fill(source, ranges)
    for views, want in expected:
        for kind in views:
            assert torch.equal(views[kind], want[kind])
    payload = sum(3 * (r.stop - r.start) * 4 for r in ranges)
    headers = stats.bytes_read - index_bytes - payload
    assert 0 < headers < 16 * 1024, "reads besides the payload are the shard files' headers only"
    source.close()
    weights = consolidated_weights(tmp_path, tied_head=True)
    assert sorted(weights) == sorted(dict(model_state[0].state_dict()))


def test_missing_rows_of_a_resized_vocabulary_are_zero_and_anything_else_missing_is_an_error(tmp_path, model_state):
    _, full, moments, stages = model_state
    _write_offline(tmp_path, full, moments, stages, tp=1)
    source = open_source(tmp_path)
    name = "embedding.word_embeddings.weight"
    rows, cols = full[name].shape
    grown = (rows + 8, cols)
    dest = torch.full(grown, 5.0)
    fill(source, [FlatRange(name, grown, Rect(0, grown[0], 0, cols), 0, dest.numel(), {WEIGHT: dest.view(-1)})],
         resizable_rows=frozenset({name}))
    assert torch.equal(dest[:rows], full[name]) and not dest[rows:].any()
    with pytest.raises(LayoutStateError, match="checkpoint shape"):
        fill(source, [FlatRange(name, grown, Rect(0, grown[0], 0, cols), 0, dest.numel(), {WEIGHT: dest.view(-1)})])
    (tmp_path / "layout_free" / "pp00-tp00.safetensors").unlink()
    with pytest.raises(LayoutStateError, match="cannot open"):
        read_layout_free_state(tmp_path)


# --------------------------------------------------------------------------------------------- the previous format

def _write_legacy(ckpt_dir, full: dict, moments: dict, stages: list[list[str]], tp: int) -> None:
    (ckpt_dir / "layout_free").mkdir(parents=True)
    for stage, names in enumerate(stages):
        for rank in range(tp):
            payload = {
                "format": LEGACY_FORMAT, "tp_rank": rank, "tp_size": tp, "pp_rank": stage, "pp_size": len(stages),
                "step": 7.0, "client_state": {"iteration": 7, "consumed_train_samples": 56, "evaluations_done": 0},
                "weights": shard_state_dict({n: full[n] for n in names}, rank, tp),
                "moments": {k: shard_state_dict({n: m[n] for n in names}, rank, tp) for k, m in moments.items()},
            }
            torch.save(payload, ckpt_dir / "layout_free" / f"pp{stage:02d}-tp{rank:02d}.pt")


def test_previous_format_tp2_pp2_files_still_load(tmp_path, model_state):
    model, full, moments, stages = model_state
    _write_legacy(tmp_path, full, moments, stages, tp=2)
    _assert_reads_back(tmp_path, full, moments)
    weights = consolidated_weights(tmp_path, tied_head=True)
    assert sorted(weights) == sorted(model.state_dict())


def test_missing_or_partial_state_is_a_clear_error(tmp_path, model_state):
    with pytest.raises(LayoutStateError, match="no layout_free/ files.*reshard_checkpoint.py"):
        read_layout_free_state(tmp_path)
    _, full, _, _ = model_state
    _write_legacy(tmp_path, full, {}, [list(full)], tp=2)
    (tmp_path / "layout_free" / "pp00-tp01.pt").unlink()
    with pytest.raises(LayoutStateError, match="pp00-tp01.pt"):
        read_layout_free_state(tmp_path)
