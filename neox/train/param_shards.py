"""This rank's share of each parameter's gradient, fp32 weight and optimizer state, for whole-model statistics.

Every element of every parameter is owned by exactly one rank of the world:
- pipeline: a stage's copy of a tied weight (ds_pipe_replicated) is owned by the stage that holds the original;
- tensor parallel: a tp shard by its tp rank, a tp-replicated parameter (norms, row-parallel biases) by tp rank 0;
- data parallel: where DeepSpeed partitions the state over dp (ZeRO 1/2 flat partitions and the bf16 optimizer,
  reached through each parameter's `_hp_mapping`; ZeRO-3 through DeepSpeed's local API) each dp rank owns its
  slice, otherwise (ZeRO 0) dp rank 0 owns the whole parameter.
So per-rank partial sums (squares, zero counts, element counts) added over the world give the whole-model value in
one all-reduce, and no rank ever gathers a full copy of a partitioned tensor.

Gradients are read between the last backward of a step and the optimizer step (the only time ZeRO keeps them),
already averaged over dp and divided by the loss scale, before clipping.
"""
from __future__ import annotations

from typing import Iterator

import torch

from neox.parallel.topology import Topology


class ParamShards:
    def __init__(self, engine, topo: Topology, names: dict[int, str]):
        self.engine, self.topo, self.names = engine, topo, names
        optimizer = engine.optimizer
        # DeepSpeed's wrappers (ZeRO 1-3, fp16/bf16 optimizers) hold the torch optimizer as .optimizer.
        self.wrapper = optimizer if hasattr(optimizer, "optimizer") else None
        self.torch_optimizer = self.wrapper.optimizer if self.wrapper is not None else optimizer
        self._masters = self._unfused_masters()

    def _unfused_masters(self) -> dict[int, torch.Tensor]:
        """id(param) -> fp32 master, for DeepSpeed's unfused 16-bit optimizer (bf16 with ZeRO 0 outside pipelines),
        which steps per-parameter fp32 copies that the 16-bit parameters only mirror."""
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        if not isinstance(self.wrapper, FP16_UnfusedOptimizer):
            return {}
        return {id(lp): master for lp_group, master_group in zip(self.wrapper.fp16_groups, self.wrapper.fp32_groups)
                for lp, master in zip(lp_group, master_group)}

    def owned(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(single-device name, parameter) of every trainable parameter some slice of which this rank may own."""
        for param in self.engine.module.parameters():
            if not param.requires_grad or getattr(param, "ds_pipe_replicated", False):
                continue
            if not getattr(param, "neox_tp_sharded", False) and self.topo.tp_rank != 0:
                continue
            yield self.names[id(param)], param

    def _dp_whole(self) -> bool:
        return self.topo.dp_rank == 0

    def loss_scale(self) -> float:
        scale = getattr(self.wrapper, "loss_scale", None) if self.wrapper is not None else None
        return float(scale) if isinstance(scale, (int, float, torch.Tensor)) and float(scale) > 0 else 1.0

    def grad(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """This rank's slice of the gradient (flat fp32), or None when another rank owns all of it."""
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_grad

            local = self._zero3_slice(param, safe_get_local_grad(param))
            return None if local is None else local / self.loss_scale()
        if hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            if mapping is None:
                return None
            fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).detach().float().flatten()
            if fragment.numel() == param.numel():
                # The bf16 optimizer keeps a whole-parameter buffer on every dp rank: only this rank's slice counts.
                address = mapping.lp_fragment_address
                fragment = fragment.narrow(0, address.start, address.numel)
            return fragment / self.loss_scale()
        if not self._dp_whole() or param.grad is None:
            return None
        return param.grad.detach().float().flatten() / self.loss_scale()

    def weight(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """This rank's slice of the fp32 weight (the trained master copy in 16-bit runs)."""
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_fp32_param

            return self._zero3_slice(param, safe_get_local_fp32_param(param))
        if hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            return None if mapping is None else mapping.get_hp_fragment().detach().float().flatten()
        if not self._dp_whole():
            return None
        return self._masters.get(id(param), param).detach().float().flatten()

    def states(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """This rank's slice of each per-element optimizer state (exp_avg, exp_avg_sq, momentum_buffer, ...)."""
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_optimizer_state

            return {key: self._zero3_slice(param, safe_get_local_optimizer_state(param, key))
                    for key in self._flat_state_keys()}
        if hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            if mapping is None or not mapping.optim_fragment:
                return {}
            return {key: mapping.get_optim_state_fragment(key).detach().float().flatten()
                    for key in mapping.get_optim_state_keys()}
        if not self._dp_whole():
            return {}
        state = self.torch_optimizer.state.get(self._masters.get(id(param), param), {})
        return {key: value.detach().float().flatten() for key, value in state.items()
                if key != "step" and torch.is_tensor(value) and value.numel() == param.numel()}

    def link_optimizer_states(self) -> None:
        """ZeRO 1/2 and the bf16 optimizer point each parameter at its slice of the optimizer state once, after the
        first step of one param group (possibly before the others have state): point them again."""
        if self.wrapper is not None and hasattr(self.wrapper, "_lazy_init_hp_params_optimizer_state"):
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()

    def _flat_state_keys(self) -> list[str]:
        for state in self.torch_optimizer.state.values():
            return [k for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0]
        return []

    def _zero3_slice(self, param: torch.nn.Parameter, local: torch.Tensor | None) -> torch.Tensor | None:
        """ZeRO-3's local partition without the padding that evens the last rank's partition."""
        if local is None:
            return None
        local = local.detach().float().flatten()
        group = getattr(param, "ds_process_group", None)
        rank = torch.distributed.get_rank(group=group) if group is not None else self.topo.dp_rank
        start = rank * local.numel()
        return local.narrow(0, 0, max(0, min(local.numel(), param.ds_numel - start)))
