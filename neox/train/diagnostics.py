"""gpt-neox's per-step training diagnostics: per-parameter gradient norms, % zero gradients, weight norms, optimizer
state norms, and the gradient noise scale.

Names as gpt-neox logs them: gradient_norms/<name>, pct_grad_zeros/<name>, parameter_norms/<name>,
optimizer_state_norms/<name>_<state> (gpt-neox puts the optimizer's index of the parameter where we put its
name) and noise_scale (gpt-neox: train/noise_scale), with single-device parameter names, one record per step.

The gradients are read by a hook run just before DeepSpeed's optimizer step (engine._take_model_step, called once
per step by both the plain and the pipeline engine); weights and optimizer states after the step. Each rank sums
over the elements it owns (neox/train/param_shards.py), and one all-reduce per step gives rank 0 the whole-model
values, whatever the layout: ZeRO 0-3, tp, pp (gpt-neox reads whole gradients on one rank, so refuses ZeRO >= 1
for the noise scale and pipelines for gradient norms).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from neox.config.log import LogConfig
from neox.parallel.topology import Topology
from neox.train.noise_scale import N_TERMS, GradientNoiseScale
from neox.train.param_shards import ParamShards

# Per-name slots of the reduced vector.
_GRAD_SQ, _GRAD_ZEROS, _GRAD_NUMEL, _WEIGHT_SQ = range(4)
_FIXED = 4


class TrainingDiagnostics:
    def __init__(self, log: LogConfig, engine, topo: Topology, names: dict[int, str], train_batch_size: int):
        self.log = log
        self.shards = ParamShards(engine, topo, names)
        self.per_param = log.per_step_diagnostics()
        self.noise = GradientNoiseScale(train_batch_size, log.gradient_noise_scale_n_batches,
                                        cpu_offload=log.gradient_noise_scale_cpu_offload) \
            if log.log_gradient_noise_scale else None
        self._grad_stats: dict[str, torch.Tensor] | None = None
        self._noise_terms: torch.Tensor | None = None
        self._layout: tuple[list[str], list[str]] | None = None  # (names, optimizer state keys), world-wide
        self._device = next(engine.module.parameters()).device
        self._install(engine)

    def _install(self, engine) -> None:
        take_model_step = engine._take_model_step

        def diagnosed_model_step(*args, **kwargs):
            self._read_gradients()
            return take_model_step(*args, **kwargs)

        engine._take_model_step = diagnosed_model_step

    def _read_gradients(self) -> None:
        """Between the last backward and the optimizer step: the only moment ZeRO still holds the gradients."""
        stats: dict[str, torch.Tensor] = {}  # kept on the device: no host sync per parameter
        slices = []
        for name, param in self.shards.owned():
            grad = self.shards.grad(param)
            if grad is None:
                continue
            if self.per_param:
                stats[name] = torch.stack([torch.sum(grad.double() ** 2), (grad == 0).sum().double(),
                                           torch.tensor(float(grad.numel()), dtype=torch.float64, device=grad.device)])
            if self.noise is not None:
                slices.append(grad)
        self._grad_stats = stats
        if self.noise is not None:
            local = torch.cat(slices) if slices else torch.zeros(0)
            self._noise_terms = self.noise.local_terms(local)

    def after_step(self, iteration: int) -> dict[str, Any] | None:
        """Collective (every rank, every step): the record rank 0 logs for this step; None elsewhere."""
        if self._grad_stats is None:
            return None  # no optimizer step ran (nothing to report)
        if self.per_param and self.log.log_optimizer_states:
            self.shards.link_optimizer_states()
        names, keys = self._world_layout()
        width = _FIXED + len(keys)
        vector = torch.zeros(len(names) * width + N_TERMS, dtype=torch.float64, device=self._device)
        if self.per_param:
            index = {name: i for i, name in enumerate(names)}
            for name, param in self.shards.owned():
                row = index[name] * width
                if name in self._grad_stats:
                    vector[row + _GRAD_SQ:row + _GRAD_NUMEL + 1] = self._grad_stats[name]
                if self.log.log_param_norm:
                    weight = self.shards.weight(param)
                    if weight is not None:
                        vector[row + _WEIGHT_SQ] = torch.sum(weight.double() ** 2)
                if self.log.log_optimizer_states:
                    for key, value in self.shards.states(param).items():
                        vector[row + _FIXED + keys.index(key)] = torch.sum(value.double() ** 2)
        if self._noise_terms is not None:
            vector[-N_TERMS:] = self._noise_terms
        self._grad_stats, self._noise_terms = None, None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(vector)
        vector = vector.cpu()
        if self.noise is not None:
            self.noise.commit(vector[-N_TERMS:])
        if _rank() != 0:
            return None
        return self._record(iteration, vector, names, keys, width)

    def _record(self, iteration: int, vector: torch.Tensor, names: list[str], keys: list[str],
                width: int) -> dict[str, Any] | None:
        log = self.log
        record: dict[str, Any] = {"iteration": iteration}
        for i, name in enumerate(names):
            row = vector[i * width:(i + 1) * width].tolist()
            if log.log_grad_norm and row[_GRAD_NUMEL] > 0:
                record[f"gradient_norms/{name}"] = math.sqrt(row[_GRAD_SQ])
            if log.log_grad_pct_zeros and row[_GRAD_NUMEL] > 0:
                record[f"pct_grad_zeros/{name}"] = 100.0 * row[_GRAD_ZEROS] / row[_GRAD_NUMEL]
            if log.log_param_norm:
                record[f"parameter_norms/{name}"] = math.sqrt(row[_WEIGHT_SQ])
            if log.log_optimizer_states:
                for k, key in enumerate(keys):
                    record[f"optimizer_state_norms/{name}_{key}"] = math.sqrt(row[_FIXED + k])
        if self.noise is not None and self.noise.noise_scale is not None:
            record["noise_scale"] = self.noise.noise_scale
        return record if len(record) > 1 else None  # the noise scale alone, before its first estimate

    def _world_layout(self) -> tuple[list[str], list[str]]:
        """Every rank's parameter names (pipeline stages hold different ones) and optimizer state keys, agreed once,
        after the first step (when the optimizer states exist)."""
        if self._layout is not None:
            return self._layout
        names = [name for name, _ in self.shards.owned()] if self.per_param else []
        keys: list[str] = []
        if self.per_param and self.log.log_optimizer_states:
            for _, param in self.shards.owned():
                keys += [k for k in self.shards.states(param) if k not in keys]
        gathered = [(names, keys)]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (names, keys))
        all_names: list[str] = []
        all_keys: list[str] = []
        for rank_names, rank_keys in gathered:
            all_names += [n for n in rank_names if n not in all_names]
            all_keys += [k for k in rank_keys if k not in all_keys]
        self._layout = (all_names, all_keys)
        return self._layout


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def build_diagnostics(log: LogConfig, engine, topo: Topology, names: dict[int, str],
                      train_batch_size: int) -> TrainingDiagnostics | None:
    if not (log.per_step_diagnostics() or log.log_gradient_noise_scale):
        return None
    return TrainingDiagnostics(log, engine, topo, names, train_batch_size)
