"""FLOPs per optimizer step and the step time and tokens/s they imply at a peak and an assumed MFU.

The count is the training loop's own (neox/train/flops.py: 6N + 12 L h s per token, recomputation not counted), so
a plan's MFU and the MFU a run logs mean the same thing. N is the active parameters: a MoE layer's token runs k
of its E experts (neox/model/moe.py:inactive_params), as Megatron counts MoE FLOPs. Hardware FLOPs add the
recomputed forward pass (2N + 4 L h s per token) when checkpoint_activations is on.
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.neox_config import NeoXConfig
from neox.model.moe import inactive_params
from neox.train.flops import matmul_params, train_flops_per_token


@dataclass(frozen=True)
class Throughput:
    tokens_per_step: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    world_size: int
    peak_flops_per_rank: float
    mfu: float
    pipeline_bubble: float  # idle fraction of a 1F1B pipeline: (stages - 1) / (micro-batches + stages - 1)

    @property
    def model_flops_per_step(self) -> float:
        return self.model_flops_per_token * self.tokens_per_step

    @property
    def step_time_s(self) -> float:
        return self.model_flops_per_step / (self.world_size * self.peak_flops_per_rank * self.mfu)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def model_flops_per_rank(self) -> float:
        """Achieved model FLOP/s per rank at the assumed MFU."""
        return self.peak_flops_per_rank * self.mfu

    @property
    def hardware_flops_per_rank(self) -> float:
        return self.model_flops_per_rank * self.hardware_flops_per_token / self.model_flops_per_token


def throughput(cfg: NeoXConfig, total_params: int, peak_flops_per_rank: float, mfu: float) -> Throughput:
    m, t = cfg.model, cfg.train
    n_matmul = matmul_params(total_params - inactive_params(m), m.padded_vocab_size, m.hidden_size,
                             tied_head=not m.no_weight_tying,
                             learned_pos_rows=m.max_positions if m.pos_emb == "learned" else 0)
    per_token = train_flops_per_token(n_matmul, m.num_layers, m.hidden_size, m.seq_length)
    hardware = per_token * (4.0 / 3.0) if m.checkpoint_activations else per_token
    stages = cfg.parallel.pipe_stages
    accum = t.gradient_accumulation_steps
    bubble = (stages - 1) / (accum + stages - 1) if cfg.parallel.pipe_parallel_size >= 1 else 0.0
    return Throughput(
        tokens_per_step=t.train_batch_size * m.seq_length,
        model_flops_per_token=per_token,
        hardware_flops_per_token=hardware,
        world_size=cfg.derived.world_size,
        peak_flops_per_rank=peak_flops_per_rank,
        mfu=mfu,
        pipeline_bubble=bubble,
    )
