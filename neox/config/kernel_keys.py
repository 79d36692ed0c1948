"""gpt-neox keys that only pick CUDA kernels (fused softmax, bias+gelu, rotary, norms): accepted, ignored, warned.

neox computes the same functions with PyTorch ops, and the fused kernels come from the device through
torch.nn.functional.scaled_dot_product_attention and torch's own fusions, so these switches have nothing to switch.
A gpt-neox config that sets them still loads. Keys that change the computed function (fp16_lm_cross_entropy,
apply_query_key_layer_scaling, use_bnb_optimizer's 8-bit optimizer states, ...) are not here: they stay unknown keys.
"""
from __future__ import annotations

import logging

from neox.config.errors import ConfigError

KERNEL_CHOICE_KEYS = frozenset({
    "scaled_upper_triang_masked_softmax_fusion",
    "scaled_masked_softmax_fusion",
    "bias_gelu_fusion",
    "bias_dropout_fusion",
    "rope_fusion",
    "layernorm_fusion",
    "rmsnorm_fusion",
    "use_flashattn_swiglu",
})

_log = logging.getLogger("neox.config")
_warned: set[str] = set()  # deepy resolves a config more than once; say it once per process


def accept_kernel_key(key: str, value: object, where: str) -> None:
    """Check a kernel-choice key's value and warn, once, that it has no effect."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {type(value).__name__} {value!r}")
    if key not in _warned:
        _warned.add(key)
        _log.warning("%s: '%s' ignored: neox picks fused kernels from the device (gpt-neox's CUDA fusion switch "
                     "changes nothing here)", where, key)
