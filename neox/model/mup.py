"""muP on the single-device model, as gpt-neox applies it with Microsoft's `mup` package (its reference).

Widths are measured per parameter against a base shape (neox/model/base_shapes.py): a dim whose base entry is a
number is a "width" of width_mult = dim / base dim, a None entry is a fixed dim (vocabulary, positions). A parameter
with two width dims is matrix-like (hidden weights), one is vector-like (embedding, head, norms, biases); `width_mult`
is that of its last width dim (the fan-in of a matrix), as mup's InfShape.width_mult().

What muP changes here, each as gpt-neox does it:
- init: a matrix-like weight drawn from a normal method gets std / sqrt(width_mult) (mup.init.normal_); xavier
  methods get mup.init.xavier_*'s adjustment; every randomly drawn weight is then multiplied by mup_init_scale.
  init_weights draws the standard values and `init_factors` gives the per-weight multiplier: the same random draws
  scaled, so a muP model and a standard one built from one seed differ by exactly these factors.
- attention scores: q.k / (head_dim * mup_attn_temp) instead of q.k / sqrt(head_dim);
- embedding output x mup_embedding_mult; absolute position vectors (learned, sinusoidal) x mup_rp_embedding_mult;
- readout: the head's input / (width_mult of the head weight * mup_output_temp) (mup.MuReadout, without its
  rescale of the init, which gpt-neox's re-initialisation overwrites). Applied to the final norm's output, which
  every layout's head reads (single device, tensor-parallel, the pipeline's tied head, the decoders).
The learning rates (MuAdam / MuSGD) are set per parameter in neox/optim/mup.py:mup_param_groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model.init import RESIDUAL_OUTPUTS, init_std

BaseShape = tuple[int | None, ...]
HEAD, EMBEDDING = "head.weight", "embedding.word_embeddings.weight"


class MupError(ConfigError):
    """A base-shapes file that is missing, malformed or written for another architecture."""


@dataclass(frozen=True)
class MupSetup:
    """What the model needs to run in muP: the base shapes and gpt-neox's five muP multipliers.

    base_shapes None: not muP; only mup_rp_embedding_mult applies (gpt-neox multiplies the absolute position
    embeddings by it with or without use_mup).
    """

    base_shapes: Mapping[str, BaseShape] | None
    init_scale: float = 1.0
    attn_temp: float = 1.0
    output_temp: float = 1.0
    embedding_mult: float = 1.0
    rp_embedding_mult: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.base_shapes is not None


@dataclass(frozen=True)
class ParamWidth:
    """A parameter's shape against its base shape: mup's InfShape reduced to what init and optimizers read."""

    dims: tuple[int, ...]
    base: BaseShape

    @property
    def ninf(self) -> int:
        return sum(b is not None for b in self.base)

    def dim_mult(self, i: int) -> float:
        return 1.0 if self.base[i] is None else self.dims[i] / self.base[i]

    @property
    def width_mult(self) -> float:
        widths = [i for i, b in enumerate(self.base) if b is not None]
        return self.dim_mult(widths[-1]) if widths else 1.0

    @property
    def fanin_fanout_ratio(self) -> float:
        """(fan-in width_mult) / (fan-out width_mult) of a [out, in] matrix: MuSGD's lr divisor."""
        return self.dim_mult(1) / self.dim_mult(0)


def param_widths(shapes: Mapping[str, tuple[int, ...]], base_shapes: Mapping[str, BaseShape],
                 origin: str = "base shapes") -> dict[str, ParamWidth]:
    """name -> ParamWidth for every parameter; the base shapes must name exactly these parameters."""
    missing, extra = sorted(set(shapes) - set(base_shapes)), sorted(set(base_shapes) - set(shapes))
    if missing or extra:
        raise MupError(f"{origin} do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}; they were "
                       "written for another architecture: run once with save_base_shapes: true to rewrite them")
    widths = {}
    for name, dims in shapes.items():
        base = tuple(base_shapes[name])
        if len(base) != len(dims):
            raise MupError(f"{origin}: {name} has base shape {list(base)} but the model's is {list(dims)}")
        width = ParamWidth(tuple(dims), base)
        if width.ninf > 2:
            raise MupError(f"{origin}: {name} has {width.ninf} width dims; muP handles at most 2")
        widths[name] = width
    return widths


def model_widths(model: nn.Module, base_shapes: Mapping[str, BaseShape]) -> dict[str, ParamWidth]:
    return param_widths({n: tuple(p.shape) for n, p in model.named_parameters()}, base_shapes)


def _method_of(name: str, cfg: ModelConfig) -> str:
    """The init method init_weights draws a weight with (see neox/model/init.py)."""
    module = name.rsplit(".", 1)[0]
    return cfg.output_layer_init_method if module.endswith(RESIDUAL_OUTPUTS) else cfg.init_method


def init_factor(name: str, width: ParamWidth, cfg: ModelConfig, init_scale: float) -> float:
    """The multiplier turning init_weights' standard draw of a weight into gpt-neox's muP draw; 1.0 for the
    vectors init_weights fills with constants (norm gains 1, biases 0), which gpt-neox leaves as they are."""
    if len(width.dims) < 2:
        return 1.0
    method = _method_of(name, cfg)
    if init_std(method, cfg) is not None:
        # mup.init.normal_: std unchanged for vector-like, std / sqrt(width_mult) for matrix-like.
        factor = width.width_mult ** -0.5 if width.ninf == 2 else 1.0
    elif method in ("xavier_uniform", "xavier_normal"):
        # mup.init.xavier_*: the std of the base model's fans, then / sqrt(fan-in width_mult) for matrix-like.
        fan_out, fan_in = width.dims[0], width.dims[1]
        base_out = width.base[0] if width.base[0] is not None else fan_out
        base_in = width.base[1] if width.base[1] is not None else fan_in
        factor = math.sqrt((fan_out + fan_in) / (base_out + base_in))
        if width.ninf == 2:
            factor /= math.sqrt(width.dim_mult(1))
    else:
        raise MupError(f"init method {method!r} has no muP version; use a normal or xavier method with use_mup")
    return factor * init_scale


def init_factors(widths: Mapping[str, ParamWidth], cfg: ModelConfig, init_scale: float) -> dict[str, float]:
    return {name: init_factor(name, w, cfg, init_scale) for name, w in widths.items()}


def readout_mult(widths: Mapping[str, ParamWidth], output_temp: float) -> float:
    """The head's input multiplier: 1 / (width_mult of the head weight (the embedding's when tied) * temp)."""
    head = widths.get(HEAD) or widths[EMBEDDING]
    return 1.0 / (head.width_mult * output_temp)


def _scale_output(mult: float):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output * mult
    return hook


def apply_mup(model: nn.Module, mup: MupSetup) -> dict[str, ParamWidth]:
    """In place, on a freshly built GPTNeoX (standard init drawn, any device incl. meta): muP multipliers and
    init. Returns the parameter widths (empty when mup only carries the position multiplier)."""
    model.embedding.position_mult = mup.rp_embedding_mult
    if not mup.enabled:
        return {}
    widths = model_widths(model, mup.base_shapes)
    model.embedding.output_mult = mup.embedding_mult
    for block in model.blocks:
        block.attention.softmax_scale = 1.0 / (block.attention.head_dim * mup.attn_temp)
    model.final_norm.register_forward_hook(_scale_output(readout_mult(widths, mup.output_temp)))
    factors = init_factors(widths, model.cfg, mup.init_scale)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if factors[name] != 1.0 and not param.is_meta:
                param.mul_(factors[name])
    return widths


def mup_init_factors(model: nn.Module) -> dict[str, float]:
    """name -> init factor of a GPTNeoX built with muP ({} without): neox/parallel/materialize.py scales the
    standard initial values it replays by them."""
    widths = getattr(model, "mup_widths", None)
    if not widths:
        return {}
    return init_factors(widths, model.cfg, model.mup.init_scale)


def widths_by_param(model: nn.Module) -> dict[int, ParamWidth] | None:
    """id(parameter) -> its width, for the optimizer; None when the model is not muP. Call on the GPTNeoX after
    tensor parallelism (its names stay the single-device ones; the pipeline stages hold these same tensors)."""
    widths = getattr(model, "mup_widths", None)
    if not widths:
        return None
    return {id(p): widths[name] for name, p in model.named_parameters()}
