"""What GPTNeoX's state dict holds beyond one entry per parameter module: layers sharing parameters
(num_unique_layers) are saved once, under the first layer running them, and loaded back into every alias; the rotary
inv_freq buffers (rotary_save_freqs_buffer) are derived from the config, so a state dict loads with or without
them, and formats keeping parameters only take them from `persistent_buffers`."""
from __future__ import annotations

import torch
from torch import nn

from neox.config.model import ModelConfig
from neox.model.positions import rotary_inv_freq


def register_state_dict_hooks(model: nn.Module, shared_layers: bool, rotary: bool) -> None:
    if shared_layers:
        model._register_state_dict_hook(_drop_shared_layer_keys)
        model._register_load_state_dict_pre_hook(_add_shared_layer_keys, with_module=True)
    if rotary:
        model._register_load_state_dict_pre_hook(_match_inv_freq, with_module=True)


def persistent_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The buffers GPTNeoX(cfg) saves in its state dict (derived from the config, never trained): checkpoint
    formats that keep parameters only take them from here."""
    if cfg.pos_emb != "rotary" or not cfg.rotary_save_freqs_buffer:
        return {}
    inv_freq = rotary_inv_freq(cfg.rotary_ndims, cfg.rotary_emb_base, device="cpu")
    owners = sorted(set(cfg.layer_owners))
    return {f"blocks.{layer}.attention.rotary_emb.inv_freq": inv_freq.clone() for layer in owners}


def _shared_layer_aliases(cfg: ModelConfig) -> dict[str, str]:
    """'blocks.i.' -> 'blocks.f.' for every layer i that runs the parameters first owned by layer f < i."""
    return {f"blocks.{layer}.": f"blocks.{owner}." for layer, owner in enumerate(cfg.layer_owners) if owner != layer}


def _drop_shared_layer_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for alias in _shared_layer_aliases(module.cfg):
        for key in [k for k in state_dict if k.startswith(prefix + alias)]:
            del state_dict[key]


def _add_shared_layer_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for alias, owner in _shared_layer_aliases(module.cfg).items():
        for key in [k for k in state_dict if k.startswith(prefix + owner)]:
            state_dict.setdefault(prefix + alias + key[len(prefix + owner):], state_dict[key])


def _match_inv_freq(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """The rotary inv_freq buffers are derived from the config: a state dict loads whether or not it carries them
    (rotary_save_freqs_buffer only decides what this model saves)."""
    own = {prefix + name: buffer for name, buffer in module.named_buffers() if name.endswith("rotary_emb.inv_freq")}
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("rotary_emb.inv_freq") and k not in own]:
        del state_dict[key]
    for key, buffer in own.items():
        state_dict.setdefault(key, buffer.detach().clone())
