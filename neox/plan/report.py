"""The plan as text: layout, batch arithmetic, parameters, per-rank memory by term, FLOPs and step time."""
from __future__ import annotations

from neox.checkpoint.shard_files import BUFFER_BYTES
from neox.plan.memory import DTYPE_BYTES, RankMemory, model_build_bytes
from neox.plan.plan import Plan

GIB = 1024 ** 3


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 1024 ** 2:.0f} MiB"


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.3g} s"


def format_plan(plan: Plan) -> str:
    cfg, thr = plan.cfg, plan.throughput
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.derived
    tp, pp = cfg.parallel.model_parallel_size, len(plan.params.stages)
    per_node = d.world_size // max(d.node_count, 1)
    lines = [f"deepy plan: {' '.join(cfg.sources)}"]
    device = plan.accelerator.name if plan.accelerator else "CPU (this machine)"
    lines.append(f"layout       world {d.world_size} = {d.node_count} node(s) x {per_node} rank(s) on {device}; "
                 f"dp {d.data_parallel_size} x tp {tp} x pp {pp}; "
                 + (f"ep {plan.experts.ep} (experts split over dp); " if plan.experts and plan.experts.ep > 1 else "")
                 + f"ZeRO stage {o.zero_stage}; {o.precision}")
    lines.append(f"batch        micro-batch {t.train_micro_batch_size_per_gpu} x grad-accum "
                 f"{t.gradient_accumulation_steps} x dp {d.data_parallel_size} = global batch {t.train_batch_size} "
                 f"sequences x {m.seq_length} tokens = {thr.tokens_per_step:,} tokens/step")
    lines.append(f"parameters   {plan.params.total:,} total; {plan.largest_stage_params:,} on the largest rank "
                 f"(a tp shard of one pipeline stage)")
    lines += _experts(plan)
    lines.append("")
    lines += _memory_table(plan)
    lines.append("")
    n = "N active" if plan.params.experts else "N"
    lines.append(f"FLOPs        {_si(thr.model_flops_per_token, 'FLOP')}/token (6{n} + 12 L h s, as the training "
                 f"loop counts them for MFU) = {_si(thr.model_flops_per_step, 'FLOP')}/step")
    if m.checkpoint_activations:
        lines.append(f"             {_si(thr.hardware_flops_per_token * thr.tokens_per_step, 'FLOP')}/step counting "
                     "the recomputed forward (hardware FLOPs)")
    lines.append(f"peak         {_si(plan.peak.flops, 'FLOP/s')} per rank: {plan.peak.source}")
    lines.append(f"assumed MFU  {thr.mfu:.0%} (--mfu; covers communication, pipeline bubble "
                 f"{thr.pipeline_bubble:.1%}, kernels below peak)")
    lines.append(f"estimate     step {_duration(thr.step_time_s)}; {thr.tokens_per_s:,.0f} tokens/s "
                 f"({thr.tokens_per_s / thr.world_size:,.0f} per rank); {_si(thr.model_flops_per_rank, 'FLOP/s')} "
                 f"model / {_si(thr.hardware_flops_per_rank, 'FLOP/s')} hardware per rank")
    if t.train_iters:
        lines.append(f"             {t.train_iters:,} iterations = {thr.tokens_per_step * t.train_iters:,.0f} tokens "
                     f"in {_duration(thr.step_time_s * t.train_iters)}")
    return "\n".join(lines)


def _experts(plan: Plan) -> list[str]:
    """A MoE model: the parameters a token uses, the experts' share of the model and of a rank, where their
    gradients and optimizer states are reduced and partitioned, and the expert-parallel all-to-all per step."""
    params, m, layout = plan.params, plan.cfg.model, plan.experts
    if not params.experts or layout is None:
        return []
    tp, ep, e = plan.cfg.parallel.model_parallel_size, layout.ep, m.moe_num_experts
    bytes_per = DTYPE_BYTES[plan.cfg.optim.precision]
    split = f"split over the {tp} tp ranks" if tp > 1 else ""
    if ep > 1:
        where = f" (E/ep = {layout.experts_per_rank} of the {e} experts of each MoE layer on each rank" + \
                (f", each {split})" if split else ")")
    else:
        where = f" (each expert {split})" if split else ""
    lines = [f"             {params.active:,} active per token: top-{m.moe_top_k} of {e} experts in "
             f"{len(m.moe_layer_indices)} MoE layer(s)" + (f", plus {m.moe_num_shared_experts} shared"
                                                           if m.moe_num_shared_experts else ""),
             f"experts      {params.experts:,} parameters ({params.experts / params.total:.0%} of the model); "
             f"{params.experts_per_rank:,} per rank{where}, {gib(params.experts_per_rank * bytes_per)} of "
             f"{plan.cfg.optim.precision} weights"]
    if ep > 1:
        zero, dp = plan.cfg.optim.zero_stage, plan.cfg.derived.data_parallel_size
        partitioned = (f", which also share their ZeRO-{zero} partition of gradients and optimizer states" if zero
                       else "")
        lines.append(f"             expert gradients are averaged over the dp/ep = {layout.expert_dp} rank(s) holding "
                     f"the same experts{partitioned}; the other parameters' over dp {dp}")
    return lines + _all_to_all(plan)


def _all_to_all(plan: Plan) -> list[str]:
    layout, m, t = plan.experts, plan.cfg.model, plan.cfg.train
    if layout.ep == 1:
        return [f"all-to-all   none (moe_expert_parallel_size 1: every rank holds all {m.moe_num_experts} experts)"]
    busiest = max(layout.stages, key=lambda stage: stage.bytes_sent)
    recomputed = ", + 2 recomputed" if busiest.row_exchanges > 4 else ""
    lines = [f"all-to-all   {busiest.bytes_sent:,} bytes ({gib(busiest.bytes_sent)}) sent per rank per step under "
             f"uniform routing, where (ep-1)/ep = {layout.ep - 1}/{layout.ep} of the rows leave the rank:",
             f"             {busiest.moe_layers} MoE layer(s) x {t.gradient_accumulation_steps} micro-batch(es) x "
             f"[{busiest.row_exchanges} exchanges (tokens to their experts and back, forward and backward"
             f"{recomputed}) x {layout.tokens:,} tokens x top-{m.moe_top_k} x {m.hidden_size} hidden x "
             f"{DTYPE_BYTES[plan.cfg.optim.precision]} bytes + {busiest.count_exchanges} x {m.moe_num_experts} "
             f"int64 row counts] x {layout.ep - 1}/{layout.ep}"]
    if len(layout.stages) > 1:
        lines.append("             per pipeline stage: " + ", ".join(f"stage {s.stage} {gib(s.bytes_sent)}"
                                                                      for s in layout.stages))
    return lines


def _memory_table(plan: Plan) -> list[str]:
    ranks = plan.ranks
    o = plan.cfg.optim
    ckpt = plan.cfg.model.checkpoint_activations
    head = f"{'memory per rank':<44}" + "".join(f"{'stage ' + str(r.stage):>12}" for r in ranks)
    if len(ranks) == 1:
        head = f"{'memory per rank':<44}{'':>12}"
    stages = plan.params.stages
    layers = ["+".join(part for part in ("emb" if st.is_first else "", str(st.blocks), "head" if st.is_last else "")
                       if part) for st in stages]
    counts = [f"{st.params / 1e6:,.1f}M" for st in stages]
    rows: list[tuple[str, list[int]]] = [
        (f"parameters ({o.precision}{', ZeRO-3 shard + working set' if o.zero_stage == 3 else ''})",
         [r.params for r in ranks]),
        (f"gradients{' (ZeRO shard)' if o.zero_stage >= 2 else ''}", [r.gradients for r in ranks]),
        (f"optimizer: Adam m, v{' + fp32 master' if o.precision != 'fp32' or o.zero_stage else ''}"
         f"{' / dp' if o.zero_stage else ''}", [r.optimizer for r in ranks]),
        ("ZeRO / all-reduce buffers", [r.buffers for r in ranks]),
        (f"activations, checkpointed{' (config)' if ckpt else ''}",
         [r.activations.with_checkpointing for r in ranks]),
        (f"activations, not checkpointed{'' if ckpt else ' (config)'}",
         [r.activations.without_checkpointing for r in ranks]),
        ("  of which logits + loss (last stage)", [r.activations.loss_block for r in ranks]),
        *_sequence_parallel_rows(ranks, ckpt),
        ("framework (see below)", [r.framework for r in ranks]),
    ]
    if any(r.model_build for r in ranks):
        rows.append(("model build (fp32)", [r.model_build for r in ranks]))
    if any(r.save_copy for r in ranks):
        rows.append((f"checkpoint save{' (async host copy)' if plan.cfg.train.checkpoint_async else ''}",
                     [r.save_copy for r in ranks]))
    lines = [head, f"  {'layers (embedding + blocks + head)':<42}" + "".join(f"{x:>12}" for x in layers),
             f"  {'parameters on the rank':<42}" + "".join(f"{x:>12}" for x in counts)]
    for label, values in rows:
        lines.append(f"  {label:<42}" + "".join(f"{gib(v):>12}" for v in values))
    lines.append(f"  {'peak (' + ('with' if ckpt else 'without') + ' checkpointing)':<42}"
                 + "".join(f"{gib(r.peak):>12}" for r in ranks))
    lines.append(f"  {'in flight micro-batches (1F1B)':<42}" + "".join(f"{r.activations.in_flight:>12}" for r in ranks))
    big: RankMemory = plan.largest
    verdict = "fits" if big.peak <= plan.capacity_bytes else "DOES NOT FIT"
    lines.append(f"largest rank: stage {big.stage}, {gib(big.peak)} at the {big.peak_phase} of "
                 f"{gib(plan.capacity_bytes)} ({plan.capacity_source}): {verdict}")
    lines += _sequence_parallel_summary(big)
    lines.append(f"framework: {gib(plan.baseline.bytes)}, {plan.baseline.how}")
    lines += _checkpoint_line(plan)
    if plan.accelerator is not None:
        par = plan.cfg.parallel
        build = model_build_bytes(plan.cfg, plan.params.largest_stage.params, plan.params.total,
                                  par.model_parallel_size, par.pipe_parallel_size)
        per_node = plan.cfg.derived.world_size // max(plan.cfg.derived.node_count, 1)
        whole = par.model_parallel_size * max(par.pipe_parallel_size, 1) == 1 and par.moe_expert_parallel_size == 1
        how = ("the whole fp32 model" if whole else
               "only its fp32 tp/ep shards of its stage's layers, drawn alone into a meta-device model")
        lines.append(f"host RAM at start-up: each rank builds {how}: {gib(build)} per rank, "
                     f"{gib(build * per_node)} per node of {per_node}")
    return lines


def _checkpoint_line(plan: Plan) -> list[str]:
    t = plan.cfg.train
    if t.save is None:
        return []
    most = max(r.save_host for r in plan.ranks)
    expert_parallel = plan.cfg.parallel.moe_expert_parallel_size > 1  # its state is the layout-free copy alone
    if t.checkpoint_async:
        what = "its layout-free shard" if expert_parallel else "its layout-free shard and DeepSpeed's state"
        how = f"checkpoint_async: each rank copies {what} to host memory, then trains on while a thread writes them"
    else:
        experts = ", of its experts' 1/(dp/ep)" if expert_parallel else ""
        how = (f"each rank writes its own layout-free shard (1/dp of its fp32 weights + Adam moments{experts}) from "
               "the engine's memory" + (", through one staging buffer" if plan.accelerator is not None else ""))
    # A resume at another layout preads each rank's own ranges straight into its tensors (via one staging buffer
    # when they are on a GPU): neox/checkpoint/shard_files.py.
    load = BUFFER_BYTES if plan.accelerator is not None else 0
    return [f"checkpoint save: {how}: {gib(most)} of extra host RAM per rank at most",
            f"checkpoint resume at another layout: each rank reads only its own byte ranges of the layout-free "
            f"shards, into its tensors: {gib(load)} of extra host RAM per rank at most"]


def _activation_bytes(activations, checkpointed: bool) -> int:
    return activations.with_checkpointing if checkpointed else activations.without_checkpointing


def _sequence_parallel_rows(ranks: tuple[RankMemory, ...], ckpt: bool) -> list[tuple[str, list[int]]]:
    """With tp > 1: the activations (in the configured checkpointing mode) had sequence_parallel the other value."""
    if ranks[0].activations_other_sp is None:
        return []
    other = "off" if ranks[0].activations.sequence_parallel else "on"
    return [(f"  activations with sequence_parallel {other}", [_activation_bytes(r.activations_other_sp, ckpt)
                                                             for r in ranks])]


def _sequence_parallel_summary(big: RankMemory) -> list[str]:
    if big.activations_other_sp is None:
        return []
    ckpt = big.checkpoint_activations
    mine, other = big.activations, big.activations_other_sp
    with_sp, without = (mine, other) if mine.sequence_parallel else (other, mine)
    saved = _activation_bytes(without, ckpt) - _activation_bytes(with_sp, ckpt)
    return [f"sequence_parallel {'on' if mine.sequence_parallel else 'off'}: stage {big.stage}'s activations are "
            f"{gib(_activation_bytes(with_sp, ckpt))} with it, {gib(_activation_bytes(without, ckpt))} without "
            f"(it saves {gib(saved)} per rank)"]
