"""Per-rank memory of a training run, term by term, as this code base and DeepSpeed allocate it.

Model states (P = parameters on the rank after the tensor/pipeline split, N = data-parallel size, a = bytes of
the training dtype: 4 for fp32, 2 for fp16/bf16):
- parameters: a*P (ZeRO-3: a*P/N plus the gathered working set, one prefetch bucket beyond the largest layer);
- gradients: a*P (ZeRO 0); a*P while backward produces them plus DeepSpeed's fp32 owned partition 4P/N
  (ZeRO-1); 4P/N (ZeRO-2/3);
- optimizer states: Adam's two fp32 moments 8P, and an fp32 master copy 4P unless the run is fp32 without ZeRO
  (DeepSpeed's ZeRO optimizer keeps an fp32 copy of its partition even for fp32 models); divided by N for ZeRO >= 1;
- expert parallelism (moe_expert_parallel_size = ep, ZeRO 0-2): P holds only the rank's E/ep experts of each MoE
  layer; ZeRO 1/2 partition those experts' fp32 gradients and optimizer states over the dp/ep ranks holding the same
  experts (DeepSpeed's expert-data-parallel group), the other parameters' over dp. Under uniform routing a rank's
  experts receive as many token rows as it sends away, so its activations are those of ep 1;
- ZeRO buffers: the gradient reduce bucket (reduce_bucket_size elements, twice with overlap_comm) that DeepSpeed
  allocates with torch.empty: fully on a GPU, only the pages gradients touch (at most P elements) on a CPU.
Activations, per micro-batch, in elements of T*h (T = micro-batch x seq_length tokens, h = hidden size), counted
from the tensors autograd saves in neox/model/model.py (tests/unit/test_plan_estimates.py checks them with
saved_tensors_hooks): block input and both norm outputs (tp-replicated; one more, x + attn, for a sequential
residual; RMSNorm's normalised input); SDPA's q, k, v, its output and the re-laid-out output, the MLP's
projection and activation outputs (split over tp); a MoE layer's MLP per routed choice: the gathered tokens and
expert outputs (tp-replicated) and the expert's hidden tensors (split), plus its router's fp32 probabilities
(moe_mlp_activation_elements). With checkpoint_activations only each block's input stays,
plus one block recomputed during backward. The last stage adds the final norm, the logits and what the loss
keeps (neox/model/loss.py: the logits and their gradient; with tp, vocab_parallel_cross_entropy's fp32
temporaries). A pipeline stage holds min(stages - stage index, gradient accumulation) micro-batches
in flight (1F1B schedule) and a send and a receive buffer per micro-batch.
sequence_parallel (tp > 1) divides the tp-replicated terms by tp, as Megatron-LM's 2205.05198 divides its 10sbh of
LayerNorm and dropout activations: block inputs and norm outputs (column-parallel layers keep only this rank's
positions and gather them again in backward), the checkpointed block inputs, the pipeline buffers and the final
norm's tensors; the tp-split terms and the logits stay as they are. Without it, partition_activations divides the
checkpointed block inputs alone by tp.
The peak is the largest of the model build (dp-only: the whole fp32 model on every rank; with tp/pp: the rank's
tp shards of its stage's layers, drawn alone from a meta-device model), the forward peak (states, gradients still held, activations), the step
after backward (states and all gradients) and a checkpoint save (save_host_bytes): each rank writes its own shard of
the layout-free copy from the engine's memory (neox/checkpoint/layout_state.py), adding at most one staging buffer
when the state is on a GPU; checkpoint_async adds one host copy of that shard and of DeepSpeed's state
(neox/checkpoint/async_save.py). On a GPU that is host RAM, reported apart from the device peak.
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.checkpoint.shard_files import BUFFER_BYTES
from neox.config.model import ModelConfig
from neox.config.neox_config import NeoXConfig
from neox.plan.params import StageParams

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bfloat16": 2}
FP32 = 4
# DeepSpeed's defaults for the keys a user's zero_optimization section may leave out.
DEFAULT_REDUCE_BUCKET = 500_000_000
DEFAULT_STAGE3_PREFETCH = 50_000_000


@dataclass(frozen=True)
class Activations:
    """Bytes of one pipeline stage's activations at the forward peak."""

    per_layer_elements: float  # saved tensors of one (dense) block per token per hidden unit, without checkpointing
    in_flight: int  # micro-batches whose activations the stage holds at once
    with_checkpointing: int
    without_checkpointing: int
    loss_block: int  # final norm, logits and the loss's tensors (last stage; included in the two above)
    sequence_parallel: bool  # the replicated terms are this rank's 1/tp of the sequence


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory by term (bytes); `peak` is what the run's high-water mark is estimated at."""

    stage: int
    params: int
    gradients: int
    gradients_in_forward: int  # the part of `gradients` already held while activations are alive
    optimizer: int
    buffers: int
    activations: Activations
    # With tp > 1: the same stage's activations with sequence_parallel flipped, for the plan to show what it saves.
    activations_other_sp: Activations | None
    checkpoint_activations: bool
    framework: int
    save_copy: int  # transient during a checkpoint save, in the memory this table counts (0 on a GPU: it is host RAM)
    save_host: int  # the same in host RAM, on any device
    save_in_background: bool  # checkpoint_async: the host copy lives on through the next training steps
    model_build: int  # host memory of building the model: the whole fp32 model (dp-only) or the rank's fp32 shards

    @property
    def activation_bytes(self) -> int:
        a = self.activations
        return a.with_checkpointing if self.checkpoint_activations else a.without_checkpointing

    @property
    def forward_peak(self) -> int:
        return (self.framework + self.params + self.optimizer + self.buffers + self.gradients_in_forward
                + self.activation_bytes)

    @property
    def step_peak(self) -> int:
        return self.framework + self.params + self.optimizer + self.buffers + self.gradients

    @property
    def save_peak(self) -> int:
        if self.save_in_background:
            return max(self.forward_peak, self.step_peak) + self.save_copy
        return self.step_peak - self.gradients + self.gradients_in_forward + self.save_copy

    @property
    def build_peak(self) -> int:
        return self.framework + self.model_build

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.step_peak, self.save_peak, self.build_peak)

    @property
    def peak_phase(self) -> str:
        phases = {"forward/backward": self.forward_peak, "optimizer step": self.step_peak,
                  "checkpoint save": self.save_peak, "model build": self.build_peak}
        return max(phases, key=phases.get)


def layer_activation_elements(m: ModelConfig, tp: int, sequence_parallel: bool = False, moe: bool = False,
                              dtype_bytes: int = 4) -> float:
    """Saved elements per token per hidden unit of one block without checkpointing (see the module docstring);
    moe: a MoE layer's (moe_mlp_activation_elements), in elements of dtype_bytes."""
    kv = m.kv_heads / m.num_attention_heads
    replicated = 3.0 + (0.0 if m.gpt_j_residual else 1.0)  # block input, both norm outputs (+ x + attn)
    if m.norm == "rmsnorm":
        replicated += 2.0  # torch's rms_norm, unfused, also saves x * rsqrt(mean(x^2)) for each norm
    attention = (1 + 2 * kv) + 2.0  # SDPA's q, k, v; its output and the re-laid-out output
    if moe:
        mlp_replicated, mlp_split = moe_mlp_activation_elements(m, dtype_bytes)
        return (replicated / (tp if sequence_parallel else 1) + mlp_replicated
                + (attention + mlp_split) / tp)
    return replicated / (tp if sequence_parallel else 1) + (attention + _mlp_elements(m, m.mlp_inner_size)) / tp


def _mlp_elements(m: ModelConfig, inner: int) -> float:
    # plain: input projection and activation output; gated: gate, activation output, linear1 output, product
    return (4.0 if m.gated_mlp else 2.0) * inner / m.hidden_size


def moe_mlp_activation_elements(m: ModelConfig, dtype_bytes: int) -> tuple[float, float]:
    """(tp-replicated, tp-split) saved elements per token per hidden unit of a MoE layer's MLP (neox/model/moe.py),
    its input (the norm output, counted with the block) excluded: per routed choice the gathered tokens and the
    expert outputs (whole on every tp rank), the expert MLP's hidden tensors at the expert width (split); the fp32
    router probabilities and logits and the int64 routing indices; a shared expert's MLP (split) and its gated
    output (replicated)."""
    h, k = m.hidden_size, m.moe_top_k
    replicated = 2.0 * k + ((2 * m.moe_num_experts + 1) * 4 + 3 * k * 8) / (h * dtype_bytes)
    split = k * _mlp_elements(m, m.expert_inner_size)
    if m.moe_num_shared_experts:
        split += _mlp_elements(m, m.shared_expert_inner_size)
        replicated += 1.0 if m.moe_shared_expert_gate else 0.0
    return replicated, split


def stage_activations(cfg: NeoXConfig, stage: StageParams, tp: int, pp: int,
                      sequence_parallel: bool | None = None) -> Activations:
    """sequence_parallel None: as the config says."""
    m, t = cfg.model, cfg.train
    sp = (cfg.parallel.sequence_parallel if sequence_parallel is None else sequence_parallel) and tp > 1
    a = DTYPE_BYTES[cfg.optim.precision]
    tokens = t.train_micro_batch_size_per_gpu * m.seq_length
    th = tokens * m.hidden_size
    shard_th = th / tp if sp else th  # a tp-replicated [tokens, hidden] activation, or this rank's sequence shard
    # DeepSpeed's partition_activations keeps 1/tp of each checkpointed block input (sequence_parallel already does).
    partitioned = m.partition_activations and m.deepspeed_activation_checkpointing and tp > 1
    checkpoint_th = th / tp if partitioned else shard_th
    per_layer = layer_activation_elements(m, tp, sp)
    per_moe_layer = layer_activation_elements(m, tp, sp, moe=True, dtype_bytes=a) if stage.moe_blocks else 0.0
    dense_blocks = stage.blocks - stage.moe_blocks
    in_flight = min(pp - stage.index, t.gradient_accumulation_steps) if pp > 1 else 1
    pipe_buffers = 2 * shard_th * a if pp > 1 else 0
    full = (dense_blocks * per_layer + stage.moe_blocks * per_moe_layer) * th * a
    # one block at a time, whatever is in flight
    recompute = max(per_layer if dense_blocks else 0.0, per_moe_layer) * th * a if stage.blocks else 0
    loss_block = 0
    if stage.is_last:
        logits = tokens * (m.padded_vocab_size // tp)
        if tp == 1:
            # neox/model/loss.py keeps the logits and one log-sum-exp per token, and backward writes one gradient.
            per_logit = 2 * a
        else:
            # vocab_parallel_cross_entropy: an fp32 copy, the saved exp(shifted), two fp32 gradients, the cast back.
            per_logit = a + 3 * FP32 + (FP32 if a != FP32 else 0) + a
        loss_block = 2 * shard_th * a + logits * per_logit  # + the final norm's input and output
    with_ckpt = in_flight * (stage.blocks * checkpoint_th * a + pipe_buffers) + recompute
    return Activations(
        per_layer_elements=per_layer,
        in_flight=in_flight,
        with_checkpointing=int(with_ckpt + loss_block),
        without_checkpointing=int(in_flight * (full + pipe_buffers) + loss_block),
        loss_block=int(loss_block),
        sequence_parallel=sp,
    )


def rank_memory(cfg: NeoXConfig, stage: StageParams, tp: int, pp: int, dp: int, *, on_gpu: bool,
                framework_bytes: int, total_params: int) -> RankMemory:
    o = cfg.optim
    zero = o.zero_stage
    a = DTYPE_BYTES[o.precision]
    p = stage.params
    ep = cfg.parallel.moe_expert_parallel_size
    experts = stage.expert_params if ep > 1 else 0  # partitioned over the expert-data-parallel group
    shard = zero_shard(p, experts, dp, ep) if zero >= 1 else p
    zcfg = o.zero_optimization
    largest_layer = max(layer.per_tp_rank for layer in stage.layers)

    if zero == 3:
        prefetch = int(zcfg.get("stage3_prefetch_bucket_size", DEFAULT_STAGE3_PREFETCH))
        params = a * (shard + min(p, largest_layer + prefetch))
    else:
        params = a * p
    if zero == 0:
        gradients = a * p
    elif zero == 1:
        gradients = a * p + FP32 * shard
    else:
        gradients = FP32 * shard
    accumulating = cfg.train.gradient_accumulation_steps > 1
    # Gradients are freed after each optimizer step (DeepSpeed sets them to None); those that live on through the
    # next forward are ZeRO-2/3's owned partition, ZeRO-1's, and everything while micro-batches accumulate.
    if accumulating:
        in_forward = gradients
    elif zero >= 1:
        in_forward = FP32 * shard
    else:
        in_forward = 0
    master = 0 if (o.precision == "fp32" and zero == 0) else FP32 * shard
    optimizer = master + 2 * FP32 * shard

    buffers = 0
    if zero in (1, 2):
        bucket = int(zcfg.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET))
        contiguous = bool(zcfg.get("contiguous_gradients", True))
        overlap = bool(zcfg.get("overlap_comm", False))
        if contiguous and (zero == 2 or overlap):
            touched = bucket if on_gpu else min(bucket, p)
            bucket_bytes = FP32 if zero == 1 else a
            buffers = touched * bucket_bytes * (2 if overlap else 1)
    elif zero == 0 and dp > 1:
        bucket = int(zcfg.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET))
        buffers = min(bucket, p) * a  # flattened gradients of one all-reduce bucket

    return RankMemory(
        stage=stage.index,
        params=params,
        gradients=gradients,
        gradients_in_forward=in_forward,
        optimizer=optimizer,
        buffers=buffers,
        activations=stage_activations(cfg, stage, tp, pp),
        # (MoE layers refuse sequence_parallel: nothing to compare)
        activations_other_sp=(stage_activations(cfg, stage, tp, pp, not cfg.parallel.sequence_parallel)
                              if tp > 1 and not cfg.model.moe_layer_indices else None),
        checkpoint_activations=cfg.model.checkpoint_activations,
        framework=framework_bytes,
        save_copy=0 if on_gpu else save_host_bytes(cfg, p, dp, a * p + optimizer, on_gpu, experts),
        save_host=save_host_bytes(cfg, p, dp, a * p + optimizer, on_gpu, experts),
        save_in_background=cfg.train.checkpoint_async,
        model_build=0 if on_gpu else model_build_bytes(cfg, p, total_params, tp, pp),  # GPU: the build is in host RAM
    )


def zero_shard(params: int, expert_params: int, dp: int, ep: int) -> int:
    """Elements of a rank's ZeRO 1/2 partition: 1/dp of its parameters, but 1/(dp/ep) of its expert-parallel
    experts' (expert_params of params), which only the dp/ep ranks holding the same experts share."""
    expert_dp = dp // ep
    return -(-(params - expert_params) // dp) + (-(-expert_params // expert_dp) if expert_params else 0)


def model_build_bytes(cfg: NeoXConfig, rank_params: int, total_params: int, tp: int, pp: int) -> int:
    """Host memory of building the model on a rank (neox/train/run.py). dp-only: the whole fp32 model. With tp, pp
    or expert parallelism the model is built on the meta device and each rank draws only its shards of its own
    stage's layers (rank_params; neox/parallel/materialize.py), a 128 x 128 tile at a time, except that an orthogonal
    init draws a whole matrix at a time: then about two copies of the largest one (the matrix and its QR) come on
    top."""
    if tp * max(pp, 1) == 1 and cfg.parallel.moe_expert_parallel_size == 1:
        return FP32 * total_params
    m = cfg.model
    orthogonal = {m.init_method, m.output_layer_init_method} & {"orthogonal", "scaled_orthogonal"}
    largest = max(m.padded_vocab_size * m.hidden_size, 3 * m.hidden_size * m.hidden_size,
                  m.mlp_inner_size * m.hidden_size)
    return FP32 * (rank_params + (2 * largest if orthogonal else 0))


def save_host_bytes(cfg: NeoXConfig, params: int, dp: int, engine_state: int, on_gpu: bool,
                    expert_params: int = 0) -> int:
    """Host memory a checkpoint save adds on a rank. The layout-free shard is the fp32 value and both Adam moments of
    the rank's 1/dp of its parameters (ZeRO's partition, or its slice of the replica at ZeRO 0; of expert_params,
    its expert-parallel experts, 1/(dp/ep)). A synchronous save writes it from where it lives: nothing on a CPU, one
    staging buffer (shard_files.BUFFER_BYTES) from a GPU. checkpoint_async copies it to host memory, and DeepSpeed's
    state too (engine_state: the module's weights, which the first dp rank writes, and the rank's optimizer states),
    while training goes on. An expert-parallel run writes no DeepSpeed files: its state is the layout-free copy."""
    t = cfg.train
    if t.save is None:
        return 0
    ep = cfg.parallel.moe_expert_parallel_size
    layout_free = t.checkpoint_layout_free or t.no_save_optim or ep > 1
    elements = zero_shard(params, expert_params, dp, ep)
    shard = (FP32 if t.no_save_optim else 3 * FP32) * elements if layout_free else 0
    if not getattr(t, "checkpoint_async", False):
        return min(shard, BUFFER_BYTES) if on_gpu else 0
    return shard + (0 if t.no_save_optim or ep > 1 else engine_state)  # those write no DeepSpeed files
