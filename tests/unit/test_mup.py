"""muP (use_mup and the mup_* keys) checked against Microsoft's `mup` package on a tiny model.

The reference is mup applied to our own module: mup.set_base_shapes on a standard-parametrised GPTNeoX, mup's
MuReadout / MuSharedReadout as its head, mup.init for the init, mup.MuAdam / mup.MuSGD for the optimizer, and an
eager attention that uses gpt-neox's muP score scale 1 / (head_dim * mup_attn_temp).
"""
from __future__ import annotations

import dataclasses
import math

import mup
import pytest
import torch
import torch.nn.functional as F

from neox.config.errors import ConfigError
from neox.config.load import load_config
from neox.config.model import ModelConfig
from neox.config.mup import MupConfig, check_mup_combinations
from neox.model import GPTNeoX, causal_lm_loss
from neox.model.base_shapes import (base_shapes_of, mup_setup, parameter_shapes, read_base_shapes,
                                    write_base_shapes)
from neox.model.mup import MupError, MupSetup, widths_by_param
from neox.parallel.materialize import materialize, meta_model
from neox.train.coord_check import coord_check_widths, coord_data
from neox.optim import build_optimizer, set_lr

VOCAB, SEQ, BASE, WIDE = 96, 16, 64, 128
MULTS = dict(init_scale=0.7, attn_temp=1.5, output_temp=2.0, embedding_mult=3.0, rp_embedding_mult=0.5)
VARIANTS = {
    "rotary-tied": dict(pos_emb="rotary", rotary_pct=0.25),
    "learned-untied-swiglu": dict(pos_emb="learned", no_weight_tying=True, activation="swiglu", num_kv_heads=2),
}


def _cfg(width: int, **changes) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=width, num_attention_heads=4, seq_length=SEQ, padded_vocab_size=VOCAB,
                       **changes)


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory) -> dict[str, str]:
    """Our base-shapes file per variant: base width 64, delta 128."""
    out = {}
    for name, changes in VARIANTS.items():
        path = tmp_path_factory.mktemp("mup") / f"{name}.bsh"
        write_base_shapes(path, base_shapes_of(_cfg(BASE, **changes), 2))
        out[name] = str(path)
    return out


def _ours(variant: str, path: str, width: int = WIDE, seed: int = 0, **mults) -> GPTNeoX:
    torch.manual_seed(seed)
    return GPTNeoX(_cfg(width, **VARIANTS[variant]), MupSetup(read_base_shapes(path), **mults))


def _eager_mup_attention(attn_temp: float):
    """softmax(q k^T / (head_dim * attn_temp) + causal) v, written out: the reference for the score scale."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and dropout_p == 0.0
        if enable_gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] * attn_temp)
        if is_causal:
            s = q.shape[-2]
            scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        return scores.softmax(-1) @ v
    return sdpa


class Reference:
    """Our model's weights in a standard GPTNeoX made muP by the mup package (plus the multipliers mup leaves to
    the user: embedding, position and attention), for forward and optimizer comparisons."""

    def __init__(self, ours: GPTNeoX, variant: str, path: str, monkeypatch, **mults):
        cfg = ours.cfg
        self.model = GPTNeoX(cfg)
        self.model.load_state_dict(ours.state_dict())
        emb = self.model.embedding
        if cfg.no_weight_tying:
            head = mup.MuReadout(cfg.hidden_size, VOCAB, bias=False, output_mult=1 / mults["output_temp"])
            head.weight = self.model.head.weight
        else:
            head = mup.MuSharedReadout(emb.word_embeddings.weight, bias=False, output_mult=1 / mults["output_temp"])
        self.model.head = head
        mup.set_base_shapes(self.model, path, rescale_params=False)
        emb.register_forward_hook(lambda m, i, out: out * mults["embedding_mult"])
        if emb.position_embeddings is not None:
            emb.position_embeddings.register_forward_hook(lambda m, i, out: out * mults["rp_embedding_mult"])
        self.sdpa = _eager_mup_attention(mults["attn_temp"])
        self.monkeypatch = monkeypatch

    def __call__(self, tokens, position_ids):
        with self.monkeypatch.context() as patch:
            patch.setattr(F, "scaled_dot_product_attention", self.sdpa)
            return self.model(tokens, position_ids=position_ids)


def _batch(seed: int = 0, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=gen)
    return tokens[:, :-1], torch.arange(SEQ).expand(batch, SEQ), tokens[:, 1:]


def _decay_groups(model, weight_decay):
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------- base shapes

def test_base_shapes_file_is_mups(shapes_files) -> None:
    for name, path in shapes_files.items():
        cfg = _cfg(BASE, **VARIANTS[name])
        delta = dataclasses.replace(cfg, hidden_size=WIDE)
        theirs = mup.make_base_shapes(parameter_shapes(cfg), parameter_shapes(delta))
        loaded = mup.load_base_shapes(path)  # mup reads our file
        assert {k: v.base_shape() for k, v in loaded.items()} == {k: v.base_shape() for k, v in theirs.items()}
        assert {k: list(v) for k, v in read_base_shapes(path).items()} == {k: v.base_shape() for k, v in theirs.items()}
    bsh = read_base_shapes(shapes_files["rotary-tied"])
    assert bsh["embedding.word_embeddings.weight"] == (None, BASE)  # vocabulary fixed, hidden a width
    assert bsh["blocks.0.mlp.linear2.weight"] == (BASE, 4 * BASE)
    assert "head.weight" not in bsh  # tied: the embedding


def test_base_shapes_errors(shapes_files, tmp_path) -> None:
    with pytest.raises(MupError, match="not found.*save_base_shapes"):
        read_base_shapes(tmp_path / "nope.bsh")
    (tmp_path / "gptneox.bsh.0").write_text("x: [null]\n")
    with pytest.raises(MupError, match="per-rank"):
        read_base_shapes(tmp_path / "gptneox.bsh")
    (tmp_path / "bad.bsh").write_text("a: 3\n")
    with pytest.raises(MupError, match="not a mup base-shapes file"):
        read_base_shapes(tmp_path / "bad.bsh")
    # untied shapes for a tied model: the file names a parameter the model does not have
    with pytest.raises(MupError, match="another architecture"):
        untied = read_base_shapes(shapes_files["learned-untied-swiglu"])
        GPTNeoX(_cfg(WIDE, **VARIANTS["rotary-tied"]), MupSetup(untied))


# --------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("init_method", ["normal", "small_init", "xavier_normal", "xavier_uniform"])
def test_init_is_mup_init_of_the_same_draws(shapes_files, init_method) -> None:
    """Each weight = the standard draw x the factor mup.init applies (same RNG draw) x mup_init_scale."""
    variant, path = "learned-untied-swiglu", shapes_files["learned-untied-swiglu"]
    cfg = dataclasses.replace(_cfg(WIDE, **VARIANTS[variant]), init_method=init_method)
    torch.manual_seed(3)
    sp = GPTNeoX(cfg)
    torch.manual_seed(3)
    ours = GPTNeoX(cfg, MupSetup(read_base_shapes(path), init_scale=0.7))
    ref = GPTNeoX(cfg)
    mup.set_base_shapes(ref, path, rescale_params=False)
    torch_init = {"xavier_normal": torch.nn.init.xavier_normal_, "xavier_uniform": torch.nn.init.xavier_uniform_}
    mup_init = {"xavier_normal": mup.init.xavier_normal_, "xavier_uniform": mup.init.xavier_uniform_}
    checked = 0
    for (name, p_sp), (_, p_ours), (_, p_ref) in zip(sp.named_parameters(), ours.named_parameters(),
                                                      ref.named_parameters()):
        if p_sp.ndim < 2:  # norm gains and biases: constants, untouched (gpt-neox re-initialises weights only)
            assert torch.equal(p_ours, p_sp), name
            continue
        residual = name.endswith(("attention.dense.weight", "mlp.linear2.weight"))
        method = init_method if not residual else cfg.output_layer_init_method
        a, b = torch.empty(p_sp.shape), torch.empty(p_sp.shape)
        b.infshape = p_ref.infshape
        torch.manual_seed(11)
        torch_init.get(method, lambda t: torch.nn.init.normal_(t, std=1.0))(a)
        torch.manual_seed(11)
        mup_init.get(method, lambda t: mup.init.normal_(t, std=1.0))(b)
        factor = (b / a).mean().item() * 0.7
        assert (b / a).std().item() < 1e-5, name
        assert torch.allclose(p_ours, p_sp * factor, rtol=1e-6, atol=1e-9), name
        assert p_ours.std().item() == pytest.approx(p_sp.std().item() * factor, rel=1e-6), name
        checked += 1
    assert checked == 13  # embedding, positions, head, 2 x (qkv, dense, linear1, gate, linear2)
    # the hidden matrices shrink by sqrt(width_mult) = sqrt(2) for the normal family
    if init_method == "normal":
        qkv = "blocks.0.attention.query_key_value.weight"
        assert dict(ours.named_parameters())[qkv].std().item() == pytest.approx(
            dict(sp.named_parameters())[qkv].std().item() * 0.7 / math.sqrt(2), rel=1e-6)


def test_tensor_parallel_initial_values_match_the_build(shapes_files) -> None:
    """A meta-built (tp/pp) model gets, through neox/parallel/materialize.py, the single-device muP values."""
    variant, path = "learned-untied-swiglu", shapes_files["learned-untied-swiglu"]
    model = _ours(variant, path, seed=5, init_scale=0.7)
    torch.manual_seed(5)
    meta = materialize(meta_model(model.cfg, model.mup))
    materialized = dict(meta.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(materialized[name], p), name


# --------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_mups_readout_and_attention(shapes_files, variant, monkeypatch) -> None:
    ours = _ours(variant, shapes_files[variant], **MULTS).eval()
    ref = Reference(ours, variant, shapes_files[variant], monkeypatch, **MULTS)
    ref.model.eval()
    tokens, positions, _ = _batch()
    with torch.no_grad():
        ours_logits = ours(tokens, position_ids=positions)
        ref_logits = ref(tokens, positions)
        assert torch.allclose(ours_logits, ref_logits, rtol=1e-5, atol=1e-6)
        assert (ours_logits - ref_logits).abs().max().item() < 1e-6
        # The readout divides by width_mult 2 and the output temperature 2: a quarter of the standard logits of the
        # same final hidden states.
        hidden = {}
        ours.final_norm.register_forward_hook(lambda m, i, out: hidden.setdefault("x", out), prepend=True)
        ours(tokens, position_ids=positions)
        plain = F.linear(hidden["x"], ours.head.weight)
        assert torch.allclose(ours_logits, plain / 4, rtol=1e-6, atol=1e-7)
        # Without muP the two models differ: the reference is not trivially equal.
        assert not torch.allclose(GPTNeoX(ours.cfg)(tokens, position_ids=positions), ours_logits, atol=1e-3)


def test_attention_scale_is_one_over_head_dim_times_temperature(shapes_files) -> None:
    for temp in (1.0, 2.5):
        model = _ours("rotary-tied", shapes_files["rotary-tied"], attn_temp=temp)
        head_dim = WIDE // 4
        assert model.blocks[0].attention.softmax_scale == pytest.approx(1 / (head_dim * temp))
    assert GPTNeoX(_cfg(WIDE)).blocks[0].attention.softmax_scale is None  # standard: SDPA's 1/sqrt(head_dim)


# --------------------------------------------------------------------------------------------- optimizer

def _per_param(optimizer, names) -> dict[str, tuple[float, float]]:
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("variant,kind", [("rotary-tied", "adam"), ("learned-untied-swiglu", "adam"),
                                          ("learned-untied-swiglu", "sgd")])
def test_three_optimizer_steps_match_mups(shapes_files, variant, kind, monkeypatch) -> None:
    # Adam's eps 1e-4, not 1e-8: the reference's gradients differ from ours by float32 rounding (~3e-7 relative:
    # eager attention, another readout order), and Adam turns a gradient far below eps (a key bias's, zero up to
    # rounding) into an update ~ lr x gradient / eps: 1e-8 would amplify rounding noise to 1e-5 differences.
    lr, wd, eps = 1e-2, 0.1, 1e-4
    ours = _ours(variant, shapes_files[variant], **MULTS)
    ref = Reference(ours, variant, shapes_files[variant], monkeypatch, **MULTS)
    if kind == "adam":
        params = {"lr": lr, "betas": [0.9, 0.95], "eps": eps}
        ref_opt = mup.MuAdam(_decay_groups(ref.model, wd), lr=lr, betas=(0.9, 0.95), eps=eps)
    else:
        params = {"lr": lr, "momentum": 0.9}
        ref_opt = mup.MuSGD(_decay_groups(ref.model, wd), lr=lr, momentum=0.9)
    opt = build_optimizer(ours, kind, params, wd, "cpu", mup_widths=widths_by_param(ours))
    set_lr(opt, lr)  # what the loop does before every step

    names = {id(p): n for n, p in ours.named_parameters()}
    ref_names = {id(p): n for n, p in ref.model.named_parameters()}
    got, want = _per_param(opt, names), _per_param(ref_opt, ref_names)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12), name
    # MuAdam: hidden matrices lr / width_mult (2), weight decay x 2; embedding, head and vectors unchanged.
    if kind == "adam":
        assert got["blocks.0.attention.query_key_value.weight"] == pytest.approx((lr / 2, wd * 2))
        assert got["embedding.word_embeddings.weight"] == pytest.approx((lr, wd))
        assert got["final_norm.weight"] == pytest.approx((lr, 0.0))
        set_lr(opt, lr / 4)  # a scheduled lr keeps each group's muP factor
        assert _per_param(opt, names)["blocks.0.attention.query_key_value.weight"][0] == pytest.approx(lr / 8)
        set_lr(opt, lr)
    else:  # MuSGD: vectors (incl. embedding, head) lr x width_mult, square hidden matrices unchanged
        assert got["final_norm.weight"] == pytest.approx((lr * 2, 0.0))
        assert got["head.weight"] == pytest.approx((lr * 2, wd / 2))
        assert got["blocks.0.attention.dense.weight"] == pytest.approx((lr, wd))

    ref_params = dict(ref.model.named_parameters())
    for step in range(3):
        tokens, positions, labels = _batch(seed=step)
        for model, optimizer, run in ((ours, opt, lambda: ours(tokens, position_ids=positions)),
                                      (ref.model, ref_opt, lambda: ref(tokens, positions))):
            optimizer.zero_grad(set_to_none=True)
            causal_lm_loss(run(), labels).backward()
            optimizer.step()
        worst = max((p - ref_params[n]).abs().max().item() for n, p in ours.named_parameters())
        # Rounding only: over init seeds 0-5 the worst is 1.8e-7 .. 1.1e-6 (the tied embedding, whose Adam updates of
        # size ~lr amplify float32 differences of its small gradients), against steps that move weights by ~1e-2.
        assert worst < 2e-6, f"step {step + 1}: weights differ from mup's by {worst:.2e}"
    moved = max((p - q).abs().max().item() for (_, p), (_, q) in
                zip(ours.named_parameters(), _ours(variant, shapes_files[variant], **MULTS).named_parameters()))
    assert moved > 1e-3  # the steps did change the weights


# --------------------------------------------------------------------------------------------- coord check

def test_coord_check_activations_flat_in_mup_growing_in_sp(shapes_files) -> None:
    cfg = _cfg(BASE, **VARIANTS["rotary-tied"])
    assert coord_check_widths(cfg) == [32, 64, 128, 256, 512, 1024]  # 4 x 2^2 = 16 has no room for rotary dims
    widths = [64, 128, 256, 512]  # from the base width up (below it, finite-width effects dominate at 2 layers)
    tokens, positions, labels = _batch(batch=2)
    batch = {"tokens": tokens, "position_ids": positions, "labels": labels, "loss_mask": torch.ones_like(labels)}
    optimizer = {"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8}}
    setup = MupSetup(read_base_shapes(shapes_files["rotary-tied"]))
    rows = {name: coord_data(cfg, mup_, widths, batch, optimizer, 0.0, seed=0)
            for name, mup_ in (("mup", setup), ("sp", None))}

    def growth(name: str, module: str, t: int) -> float:
        l1 = {r["width"]: r["l1"] for r in rows[name] if r["module"] == module and r["t"] == t}
        assert sorted(l1) == widths
        return l1[widths[-1]] / l1[widths[0]]

    assert {r["t"] for r in rows["mup"]} == {1, 2, 3, 4}
    # After 3 steps (t=4), 8x the width: measured muP 0.74 (head) .. 0.91 (blocks.1), SP 5.6 (head) .. 43 (attention).
    for module in ("head", "blocks.1", "blocks.1.attention", "blocks.1.mlp"):
        mup_growth, sp_growth = growth("mup", module, 4), growth("sp", module, 4)
        assert 0.6 < mup_growth < 1.5, (module, mup_growth)
        assert sp_growth > 4.0, (module, sp_growth)
    # At initialisation muP's hidden activations are already width-independent; gpt-neox's SP init (std 0.02 for
    # every width) makes them grow with sqrt(width) from the start.
    assert 0.8 < growth("mup", "blocks.1", 1) < 1.25
    assert growth("sp", "blocks.1", 1) > 2.0
    # MuSGD's coordinate check: its standard side is torch SGD (optimizer type sgd itself needs use_mup)
    sgd = {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}}
    for mup_ in (setup, None):
        sgd_rows = coord_data(cfg, mup_, [64, 128], batch, sgd, 0.1, seed=0, steps=1)
        assert len({(r["width"], r["t"]) for r in sgd_rows}) == 4 and all(math.isfinite(r["l1"]) for r in sgd_rows)


# --------------------------------------------------------------------------------------------- config

def test_config_rules(tmp_path) -> None:
    with pytest.raises(ConfigError, match="base_shapes_file"):
        MupConfig(use_mup=True).validate()
    with pytest.raises(ConfigError, match="does nothing without 'use_mup'"):
        MupConfig(coord_check=True).validate()
    with pytest.raises(ConfigError, match="mup_width_scale"):
        MupConfig(use_mup=True, base_shapes_file="x", mup_width_scale=1).validate()
    with pytest.raises(ConfigError, match="mup_attn_temp"):
        MupConfig(mup_attn_temp=0.0).validate()
    assert mup_setup(MupConfig()) is None
    # gpt-neox multiplies learned position embeddings by mup_rp_embedding_mult with or without use_mup
    only_rp = mup_setup(MupConfig(mup_rp_embedding_mult=2.0))
    assert only_rp is not None and not only_rp.enabled
    cfg = _cfg(BASE, pos_emb="learned")
    torch.manual_seed(0)
    plain = GPTNeoX(cfg).eval()
    torch.manual_seed(0)
    scaled = GPTNeoX(cfg, only_rp).eval()
    tokens, positions, _ = _batch()
    with torch.no_grad():
        plain.embedding.position_embeddings.weight.mul_(2.0)
        assert torch.allclose(plain(tokens, position_ids=positions), scaled(tokens, position_ids=positions))


def _load(tmp_path, text: str):
    path = tmp_path / "c.yml"
    path.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\n"
                    "train_micro_batch_size_per_gpu: 2\n" + text)
    return load_config([path], local_gpus=0)


def test_gpt_neox_spellings_and_cross_group_rules(tmp_path) -> None:
    cfg = _load(tmp_path, "use-mup: true\nbase-shapes-file: base-shapes\nmup-attn-temp: 2.0\nmup-width-scale: 4\n")
    assert cfg.mup == MupConfig(use_mup=True, base_shapes_file="base-shapes", mup_attn_temp=2.0, mup_width_scale=4)
    check_mup_combinations(cfg)
    for kind, ok in (("sgd", True), ("SGD", True), ("AdamW", True), ("lion", False), ("sm3", False)):
        cfg.optim.optimizer = {"type": kind, "params": {"lr": 0.1}}
        if ok:
            check_mup_combinations(cfg)
        else:
            with pytest.raises(ConfigError, match="Adam, AdamW and SGD only"):
                check_mup_combinations(cfg)
    cfg.optim.optimizer = {"type": "sgd", "params": {"lr": 0.1}}
    cfg.mup.use_mup = False
    with pytest.raises(ConfigError, match="sgd is muP's MuSGD"):
        check_mup_combinations(cfg)
    with pytest.raises(ConfigError, match="no muP version"):
        _load(tmp_path, "use_mup: true\nbase_shapes_file: b\ninit_method: orthogonal\n")
    with pytest.raises(ConfigError, match="base_shapes_file"):
        _load(tmp_path, "use_mup: true\n")
