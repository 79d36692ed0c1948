"""Per-rank functions that tests/distributed run through neox.parallel.testing.run_distributed (module level so
spawned ranks can import them). Each returns plain tensors/floats for the parent to compare."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neox.config.model import ModelConfig
from neox.model import GPTNeoX, causal_lm_loss
from neox.parallel.sharding import merge_state_dicts, shard_state_dict
from neox.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  VocabParallelHead, vocab_parallel_cross_entropy)

VOCAB = 96


def model_cfg(**changes) -> ModelConfig:
    base = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, pos_emb="rotary",
                       padded_vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0)
    return dataclasses.replace(base, **changes)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def mlp_column_row() -> dict:
    """column(linear1) -> gelu -> row(linear2) against the same two nn.Linear on one device."""
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(16, 32), nn.Linear(32, 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    ref = lin2(F.gelu(lin1(x)))
    ref.square().sum().backward()
    col = ColumnParallelLinear(lin1, None if size == 1 else dist.group.WORLD, rank, size)
    row = RowParallelLinear(lin2, dist.group.WORLD, rank, size)
    xp = x.detach().clone().requires_grad_(True)
    out = row(F.gelu(col(xp)))
    out.square().sum().backward()
    return {
        "out_err": (out - ref).abs().max().item(),
        "x_grad_err": (xp.grad - x.grad).abs().max().item(),
        "col_w_grad": torch.cat(_gather(col.weight.grad), 0), "col_b_grad": torch.cat(_gather(col.bias.grad), 0),
        "row_w_grad": torch.cat(_gather(row.weight.grad), 1), "row_b_grad": row.bias.grad.clone(),
        "ref": {"col_w": lin1.weight.grad, "col_b": lin1.bias.grad, "row_w": lin2.weight.grad, "row_b": lin2.bias.grad},
    }


def vocab_embedding_head_ce() -> dict:
    """Tied vocab-parallel embedding + head + vocab-parallel cross entropy against embedding/linear/F.cross_entropy."""
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    table = nn.Embedding(VOCAB, 8)
    tokens = torch.randint(0, VOCAB, (2, 7))
    labels = torch.randint(0, VOCAB, (2, 7))
    mask = (torch.rand(2, 7) > 0.3).float()
    hidden = table(tokens) * 1.5
    logits = F.linear(hidden, table.weight)
    ref_tok = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ref_loss = causal_lm_loss(logits, labels, mask)
    ref_loss.backward()

    emb = VocabParallelEmbedding(table, dist.group.WORLD, rank, size)
    head = VocabParallelHead(emb.weight, dist.group.WORLD, emb.vocab_start)
    local_logits = head(emb(tokens) * 1.5)
    per_token = vocab_parallel_cross_entropy(local_logits, labels, emb.vocab_start, dist.group.WORLD)
    loss = (per_token.flatten() * mask.flatten()).sum() / mask.sum()
    loss.backward()
    return {"tok_err": (per_token.flatten() - ref_tok).abs().max().item(),
            "loss": loss.item(), "ref_loss": ref_loss.item(),
            "grad": torch.cat(_gather(emb.weight.grad), 0), "ref_grad": table.weight.grad,
            "local_vocab": local_logits.shape[-1]}


def full_model_tp(variants: list[dict]) -> list[dict]:
    """GPTNeoX parallelised over the world as tp ranks: loss and every gradient (merged with the sharding plan)
    against the single-device model; the parallel state dict against shard_state_dict of the full one."""
    from neox.parallel.topology import build_topology

    topo = build_topology(dist.get_world_size(), 0)
    return [_one_model_tp(topo, changes) for changes in variants]


def _one_model_tp(topo, changes: dict) -> dict:
    from neox.parallel.activation_checkpoint import install_activation_checkpointing
    from neox.parallel.parallelize import apply_tensor_parallel, lm_loss_fn
    from neox.parallel.sharding import config_overrides

    size = topo.tp_size
    cfg = model_cfg(**changes)
    overrides = config_overrides(cfg)  # a row-parallel head is split along its columns
    torch.manual_seed(3)
    reference = GPTNeoX(dataclasses.replace(cfg, checkpoint_activations=False))  # checkpointing changes no number
    tokens = torch.randint(0, VOCAB, (2, 16))
    labels = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones(2, 16)
    ref_loss = causal_lm_loss(reference(tokens), labels, mask)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    full_state = {k: v.clone() for k, v in reference.state_dict().items()}

    torch.manual_seed(3)
    model = GPTNeoX(cfg)
    apply_tensor_parallel(model, topo, row_parallel_head=cfg.row_parallel_head)
    install_activation_checkpointing(model, cfg, topo)  # DeepSpeed's, partitioning over tp when asked
    state_matches = all(torch.equal(model.state_dict()[k], v)
                        for k, v in shard_state_dict(full_state, topo.tp_rank, size, overrides).items())
    loss = lm_loss_fn(topo, VOCAB, cfg.row_parallel_head)(model(tokens), labels, mask)
    loss.backward()
    local_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gathered: list = [None] * size
    dist.all_gather_object(gathered, local_grads)
    merged = merge_state_dicts(gathered, overrides)
    grad_err = max((merged[n] - g).abs().max().item() for n, g in ref_grads.items())
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "grad_err": grad_err,
            "state_matches": state_matches, "same_names": sorted(merged) == sorted(ref_grads)}


def size_errors() -> str:
    """apply_tensor_parallel refuses a model whose kv heads tp does not divide."""
    from neox.parallel.parallelize import apply_tensor_parallel
    from neox.parallel.topology import TopologyError, build_topology

    cfg = model_cfg(num_kv_heads=1)
    topo = build_topology(dist.get_world_size(), 0)
    try:
        apply_tensor_parallel(GPTNeoX(cfg), topo)
    except TopologyError as err:
        return str(err)
    return ""


def dropout_stays_replicated() -> dict:
    """With dropout on, the tp ranks of one replica seeded by dropout_seed keep bit-identical replicated
    activations (the residual stream entering the final norm) and losses."""
    from neox.parallel.parallelize import apply_tensor_parallel, lm_loss_fn
    from neox.parallel.rng import dropout_seed
    from neox.parallel.topology import build_topology

    topo = build_topology(dist.get_world_size(), 0)
    torch.manual_seed(5)
    model = GPTNeoX(model_cfg(hidden_dropout=0.3, attention_dropout=0.3)).train()
    apply_tensor_parallel(model, topo)
    captured = {}
    model.final_norm.register_forward_hook(lambda module, args, out: captured.setdefault("x", args[0].detach()))
    torch.manual_seed(dropout_seed(1234, topo))
    tokens = torch.randint(0, VOCAB, (2, 16))
    loss = lm_loss_fn(topo, VOCAB)(model(tokens), tokens, None)
    parts = _gather(captured["x"])
    losses = _gather(loss.detach().reshape(1))
    return {"replicated": all(torch.equal(p, parts[0]) for p in parts),
            "same_loss": all(torch.equal(l, losses[0]) for l in losses),
            "dropout_active": not torch.equal(captured["x"], _final_hidden(model, tokens))}


def _final_hidden(model, tokens):
    captured = {}
    handle = model.final_norm.register_forward_hook(lambda module, args, out: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model.eval()(tokens)
    handle.remove()
    return captured["x"]


def attention_dropout_per_tp_rank() -> dict:
    """tp ranks holding identical heads (the second half of every qkv copied from the first) draw different
    attention-dropout masks, while hidden dropout on the replicated stream keeps equal masks; activation
    recomputation redraws the same attention mask (gradients equal those of the plain forward)."""
    from torch.utils.checkpoint import checkpoint

    from neox.parallel.parallelize import apply_tensor_parallel
    from neox.parallel.rng import dropout_seed
    from neox.parallel.topology import build_topology

    topo = build_topology(dist.get_world_size(), 0)
    torch.manual_seed(5)
    model = GPTNeoX(model_cfg(hidden_dropout=0.3, attention_dropout=0.5))
    with torch.no_grad():
        for block in model.blocks:
            for tensor in (block.attention.query_key_value.weight, block.attention.query_key_value.bias):
                half = tensor.shape[0] // 2
                tensor[half:] = tensor[:half]
    apply_tensor_parallel(model, topo)
    local_heads, replicated = [], []
    for block in model.blocks:
        block.attention.dense.register_forward_pre_hook(lambda m, args: local_heads.append(args[0].detach()))
    model.final_norm.register_forward_hook(lambda m, args, out: replicated.append(args[0].detach()))
    tokens = torch.randint(0, VOCAB, (2, 16))

    model.eval()(tokens)
    heads_identical_without_dropout = all(torch.equal(*_gather(t)) for t in local_heads)
    local_heads.clear()
    replicated.clear()
    torch.manual_seed(dropout_seed(1234, topo))
    model.train()(tokens)
    rng_in_step = torch.equal(*_gather(torch.get_rng_state()))

    # Recomputation restores the default stream and must redraw the very attention mask.
    attention = model.blocks[0].attention
    x = torch.randn(2, 16, 32)
    grads = []
    for recompute in (False, True):
        attention.zero_grad()
        torch.manual_seed(99)
        out = checkpoint(attention, x, use_reentrant=False) if recompute else attention(x)
        out.square().sum().backward()
        grads.append(attention.query_key_value.weight.grad.clone())
    return {"heads_identical_without_dropout": heads_identical_without_dropout,
            "attention_masks_differ": all(not torch.equal(*_gather(t)) for t in local_heads),
            "hidden_masks_equal": torch.equal(*_gather(replicated[0])),
            "rng_in_step": rng_in_step, "recompute_same_mask": torch.equal(*grads)}


def meta_build_matches_full_build(variants: list[dict]) -> list[dict]:
    """Per variant: the tp shards materialised from a meta-built model equal those of the full build (seeded
    alike), and the RNG ends in the same state."""
    from neox.parallel.materialize import materialize, meta_model
    from neox.parallel.parallelize import apply_tensor_parallel
    from neox.parallel.topology import build_topology

    topo = build_topology(dist.get_world_size(), 0)
    results = []
    for changes in variants:
        cfg = model_cfg(**changes)
        torch.manual_seed(11)
        full = apply_tensor_parallel(GPTNeoX(cfg), topo, row_parallel_head=cfg.row_parallel_head)
        full_rng = torch.get_rng_state()
        torch.manual_seed(11)
        meta = apply_tensor_parallel(meta_model(cfg), topo, row_parallel_head=cfg.row_parallel_head)
        assert all(p.is_meta for p in meta.parameters())
        materialize(meta, topo.tp_rank, topo.tp_size)
        want, got = full.state_dict(), meta.state_dict()
        buffers = dict(full.named_buffers(remove_duplicate=False))
        results.append({
            "same_keys": sorted(want) == sorted(got),
            "mismatched": [k for k in want if not torch.equal(want[k], got[k])],
            "tied_kept": (meta.head.weight is meta.embedding.word_embeddings.weight) == (not cfg.no_weight_tying),
            "marks_kept": all(hasattr(p, "neox_tp_sharded") for p in meta.parameters()),
            "buffers_equal": all(torch.equal(b, dict(meta.named_buffers(remove_duplicate=False))[n])
                                 for n, b in buffers.items()),
            "rng_equal": torch.equal(torch.get_rng_state(), full_rng)})
    return results
