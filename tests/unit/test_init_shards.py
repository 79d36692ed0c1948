"""Shard-local initialisation (neox/model/init.py, neox/parallel/materialize.py): a tensor- or pipeline-parallel rank
gets its shard of the single-device initial values bit for bit, drawing the tiles of that shard and no others.

One process: the tp ranks' meta models are parallelised with a stand-in grid (apply_tensor_parallel only stores the
group; nothing here communicates). Every draw goes through neox.model.init.tile_seed, which the tests record.
"""
from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch

import neox.model.init as init
from neox.config.model import ModelConfig
from neox.model import GPTNeoX
from neox.model.base_shapes import base_shapes_of
from neox.model.mup import MupSetup
from neox.parallel.materialize import materialize, meta_model
from neox.parallel.parallelize import apply_tensor_parallel
from neox.parallel.pipeline import stage_parameters
from neox.parallel.sharding import shard_tensor, split_overrides, tp_split_dim
from neox.parallel.topology import Topology

TP = 2
# Split dims are multiples of TP x TILE (hidden 256, qkv 512 or 768 rows, MLP 512 or 1024, vocab 512): shards cut no
# tile.
BASE = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, seq_length=16, pos_emb="rotary",
                   padded_vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
VARIANTS = {
    # column (qkv of grouped-query heads, linear1, gate), row (dense, linear2), vocab embedding + vocab head
    "gqa-swiglu-untied": dict(num_kv_heads=2, activation="swiglu", intermediate_size=1536, no_weight_tying=True),
    # head split over the hidden dim; qk norm (whole on every tp rank); biases
    "row-head-qk-norm": dict(no_weight_tying=True, output_layer_parallelism="row", use_qk_layernorm=True),
    # the T5 table (xavier-normal, replicated), ScaleNorm gains, layers sharing parameters, tied head
    "rpe-scalenorm-shared": dict(pos_emb="rpe", use_qk_layernorm=True, norm="scalenorm", num_layers=4,
                                 num_unique_layers=2),
    # uniform draws; a replicated learned position table
    "xavier-learned": dict(pos_emb="learned", max_position_embeddings=320, init_method="xavier_uniform",
                           output_layer_init_method="xavier_normal"),
    # whole-matrix draws (QR), the one documented exception to drawing only the shard
    "orthogonal": dict(init_method="orthogonal", output_layer_init_method="scaled_orthogonal"),
    # shards that cut tiles (dense: 96 columns per rank, vocab 192 rows): the edge tiles are drawn whole and cut
    "unaligned": dict(hidden_size=192, num_attention_heads=4, padded_vocab_size=384),
}


def _mup(cfg: ModelConfig) -> MupSetup:
    base = dataclasses.replace(cfg, hidden_size=cfg.hidden_size // 2)
    return MupSetup(base_shapes_of(base, 2), init_scale=0.7)


def _topo(tp_rank: int = 0, tp_size: int = TP, stage: int = 0, stages: int = 1) -> Topology:
    grid = SimpleNamespace(get_slice_parallel_rank=lambda: tp_rank, get_slice_parallel_group=lambda: None,
                           get_stage_id=lambda: stage)
    return Topology(tp_size=tp_size, pp_size=stages, dp_size=1, use_pipeline=stages > 1, ds_topology=None, grid=grid)


@pytest.fixture
def drawn_tiles(monkeypatch) -> list[int]:
    """Every tile number drawn (a whole orthogonal parameter counts as its first tile)."""
    tiles: list[int] = []
    real = init.tile_seed

    def recording(seed: int, tile: int) -> int:
        tiles.append(tile)
        return real(seed, tile)

    monkeypatch.setattr(init, "tile_seed", recording)
    return tiles


def _owner(plan: init.InitPlan, tile: int) -> str:
    return next(name for name, d in plan.draws.items() if d.first_tile <= tile < d.first_tile + d.tiles)


def _build(cfg: ModelConfig, mup: MupSetup | None, tp_rank: int, stage: int = 0, stages: int = 1):
    """This rank's meta model, tensor-parallelised and materialised (a pipeline stage: its own layers only)."""
    topo = _topo(tp_rank, TP, stage, stages)
    model = apply_tensor_parallel(meta_model(cfg, mup, init_seed=1234), topo,
                                  row_parallel_head=cfg.row_parallel_head)
    own = stage_parameters(model, topo, "type:transformer") if stages > 1 else None
    return materialize(model, topo.tp_rank, topo.tp_size, own), own


@pytest.mark.parametrize("variant", [*VARIANTS, "mup"])
def test_tp_shards_are_the_single_device_slices_drawn_alone(variant, drawn_tiles) -> None:
    cfg = dataclasses.replace(BASE, **VARIANTS.get(variant, dict(num_kv_heads=2, no_weight_tying=True)))
    mup = _mup(cfg) if variant == "mup" else None
    full = dict(GPTNeoX(cfg, mup, init_seed=1234).named_parameters())
    drawn_tiles.clear()
    tiles_by_rank = []
    for rank in range(TP):
        model, _ = _build(cfg, mup, rank)
        plan = model.init_plan
        overrides = split_overrides(model.named_parameters())
        got = dict(model.named_parameters())
        assert sorted(got) == sorted(full)
        for name, param in got.items():
            want = shard_tensor(name, full[name].detach(), rank, TP, overrides)
            assert torch.equal(param.detach(), want), (variant, name, rank)
        by_param: dict[str, set[int]] = {}
        for tile in drawn_tiles:
            by_param.setdefault(_owner(plan, tile), set()).add(tile)
        tiles_by_rank.append(by_param)
        drawn_tiles.clear()

    for name, draw in plan.draws.items():
        mine = [r.get(name, set()) for r in tiles_by_rank]
        if draw.kind == "fill":
            assert not any(mine), name  # constants draw nothing
        elif draw.kind == "orthogonal":
            assert all(m == {draw.first_tile} for m in mine), name  # the whole matrix, once per rank
        elif tp_split_dim(name, overrides) is None:
            assert all(len(m) == draw.tiles for m in mine), name  # replicated: whole on every rank
        elif variant != "unaligned":
            # split: each rank draws half of the tiles, and no tile is drawn twice
            assert [len(m) for m in mine] == [draw.tiles // TP] * TP and not mine[0] & mine[1], name
        else:  # a shard boundary inside a tile: that tile is drawn by both ranks, every other one by one
            assert len(mine[0] & mine[1]) <= draw.grid[1 - tp_split_dim(name, overrides)], name
            assert len(mine[0] | mine[1]) == draw.tiles, name


@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_stage_draws_only_its_own_layers(tied, drawn_tiles) -> None:
    """pp2 x tp2: a stage's parameters are its tp shards of the single-device values; the other stage's layers stay
    on the meta device and none of their tiles is drawn (a tied embedding lives on the first and the last stage)."""
    cfg = dataclasses.replace(BASE, num_layers=4, no_weight_tying=not tied)
    full = dict(GPTNeoX(cfg, init_seed=1234).named_parameters())
    owned_names = []
    for stage, rank in itertools.product(range(2), range(TP)):
        drawn_tiles.clear()
        model, own = _build(cfg, None, rank, stage, stages=2)
        own_ids = {id(p) for p in own}
        overrides = split_overrides(model.named_parameters())
        mine = {name for name, p in model.named_parameters() if id(p) in own_ids}
        for name, param in model.named_parameters():
            if name in mine:
                assert torch.equal(param.detach(), shard_tensor(name, full[name].detach(), rank, TP, overrides))
            else:
                assert param.is_meta, (stage, name)
        assert {_owner(model.init_plan, t) for t in drawn_tiles} <= mine
        blocks = {n.split(".")[1] for n in mine if n.startswith("blocks.")}
        assert blocks == ({"0", "1"} if stage == 0 else {"2", "3"})
        owned_names.append(mine)
    first, last = owned_names[0], owned_names[-1]
    assert (first & last) == ({"embedding.word_embeddings.weight"} if tied else set())
    assert first | last == set(full)


def test_any_block_is_the_slice_of_the_whole_and_a_build_draws_nothing() -> None:
    cfg = dataclasses.replace(BASE, hidden_size=192, padded_vocab_size=300)  # edge tiles cut by the shape
    torch.manual_seed(7)
    state = torch.get_rng_state()
    model = GPTNeoX(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # a build leaves the global stream where it was
    torch.randn(10)
    again = GPTNeoX(cfg)  # the seed of the last manual_seed, not the stream's position, decides the values
    torch.manual_seed(8)
    other = GPTNeoX(cfg)
    plan, name = model.init_plan, "embedding.word_embeddings.weight"
    whole = model.embedding.word_embeddings.weight.detach()
    assert torch.equal(plan.value(name), whole)
    for rows, cols in [(slice(37, 301), slice(5, 190)), (slice(0, 1), slice(127, 129)), (slice(299, 300), None)]:
        index = (rows, cols or slice(None))
        assert torch.equal(plan.value(name, index), whole[index])
    for (n, a), (_, b), (_, c) in zip(model.named_parameters(), again.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(a, c) == (plan.draws[n].kind == "fill"), n
    # normal_(0, 0.02): the std of the whole table, and every tile its own (no two tiles' seeds coincide)
    assert whole.std().item() == pytest.approx(cfg.init_method_std, rel=0.02)
    tile_heads = whole[::init.TILE, ::init.TILE].flatten().tolist()
    assert len(set(tile_heads)) == len(tile_heads)
