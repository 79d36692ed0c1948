"""gpt-neox's weight initialisations, chosen by name from the config, drawn so that any block of any parameter
can be made without drawing the rest of the model.

Why: drawn gpt-neox's way, from one torch stream in module order, a weight's value depends on every draw before it,
so a tensor- or pipeline-parallel rank could get its shard only by replaying the whole model's draws (minutes per
rank at 20B). Here every parameter is drawn in tiles, and every tile from its own generator:

- A randomly initialised parameter is cut into TILE x TILE tiles (TILE-long pieces of a vector). Element (r, c) is
  element (r % TILE, c % TILE) of tile (r // TILE, c // TILE), and a tile is one contiguous TILE x TILE
  `normal_` / `uniform_` of torch's CPU generator seeded for that tile alone. A tile on the edge of a parameter is
  drawn whole and cut, so a value never depends on which block of the parameter is being made.
- Seeds: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so seeds hashed from (name, tile)
  would collide (hundreds of identical tiles in a 20B model). Instead the model's tiles are numbered one after the
  other in parameter order, and tile k is seeded with mix32(seed + k mod 2**32), mix32 a bijection of 32-bit
  integers (murmur3's finaliser), which scatters neighbouring tiles' seeds: every tile of a model with fewer than
  2**32 tiles (20B has ~1.2 million) has a seed of its own.
- `seed`: GPTNeoX's init_seed, by default the seed of the last torch.manual_seed (`default_init_seed`; the trainer
  seeds with the config's `seed`). The initial values are a function of the config and that seed alone: every
  rank, and every build in a process, gets the same ones, whatever else drew from the global stream before. A
  build draws nothing from the global stream (the modules' own constructor draws, nn.Linear's kaiming, which the
  plan overwrites, are undone), on the CPU and on the meta device alike, so a shape-only meta build anywhere
  cannot shift the streams of one rank.
- The orthogonal methods (orthogonal, scaled_orthogonal) need the whole matrix (a QR of it): such a parameter is
  drawn whole from its first tile's generator and then sliced. Its value is still layout-free, but a rank making
  its shard draws the whole parameter (one parameter at a time).
- Constants (norm scales 1, biases 0) need no draws.

The single-device build (GPTNeoX) fills its parameters from this plan, and neox/parallel/materialize.py fills a
rank's shards from the same plan, drawing only the tiles its rows or columns touch (plus at most one partial tile
per edge), so every layout starts from bit-identical values. Tiles cost ~10% over one `normal_` of the whole model.
The distributions are gpt-neox's; its values are not (on GPUs gpt-neox draws each tp rank's shard from that rank's
model-parallel stream, so its initial model changes with the layout).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from neox.config.model import ModelConfig

# Linear layers writing into the residual stream take output_layer_init_method (a MoE block's experts and shared
# expert included).
RESIDUAL_OUTPUTS = ("attention.dense", "mlp.linear2", "experts.linear2", "shared_expert.linear2")
TILE = 128
_MASK32 = 0xFFFFFFFF

Index = Sequence[slice]


class InitError(ValueError):
    pass


def init_std(method: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of a normal-distribution method; None for orthogonal / xavier methods."""
    sigma, layers, width = cfg.init_method_std, cfg.num_layers, cfg.hidden_size
    stds = {
        "normal": sigma,
        "scaled_normal": sigma / math.sqrt(2.0 * layers),
        "single_residual_scaled_normal": sigma / math.sqrt(layers),
        "wang_init": 2.0 / layers / math.sqrt(width),
        "small_init": math.sqrt(2.0 / (5.0 * width)),
    }
    return stds.get(method)


@dataclass(frozen=True)
class Draw:
    """How one parameter's initial value is made: kind 'fill' (value: the constant), 'normal' (value: std, mean 0),
    'uniform' (value: bound, on [-bound, bound]) or 'orthogonal' (value: gain); shape is the whole parameter's.
    A 3-D parameter is a stack of matrices (a MoE block's experts, [experts, inner, hidden]): each matrix is tiled as a
    matrix of its own (tiles 1 x TILE x TILE), so one expert's values never depend on the others'."""

    kind: str
    value: float
    shape: tuple[int, ...]
    first_tile: int = 0  # this parameter's first tile number among the model's tiles

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return (1,) * max(len(self.shape) - 2, 0) + (TILE,) * min(len(self.shape), 2)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-size // tile) for size, tile in zip(self.shape, self.tile_shape))

    @property
    def tiles(self) -> int:
        return 0 if self.kind == "fill" else math.prod(self.grid)


def method_draw(method: str, cfg: ModelConfig, shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, value) of an init method (neox/config/model.py's init_method names) for a weight of this shape."""
    std = init_std(method, cfg)
    if std is not None:
        return "normal", std
    if method == "orthogonal":
        return "orthogonal", math.sqrt(2.0)
    if method == "scaled_orthogonal":
        return "orthogonal", math.sqrt(2.0 / cfg.num_layers)
    if method in ("xavier_uniform", "xavier_normal"):
        # torch's xavier_*_ with gain 1: fan_out = rows, fan_in = the rest; of each matrix of a 3-D stack (xavier
        # is symmetric in the fans, so a stack stored [inner, hidden] for a down projection draws alike).
        fan_out, fan_in = (shape[-2], shape[-1]) if len(shape) == 3 else (shape[0], math.prod(shape[1:]))
        xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
        return ("uniform", math.sqrt(3.0) * xavier_std) if method == "xavier_uniform" else ("normal", xavier_std)
    raise InitError(f"unknown init method {method!r}")  # unreachable after ModelConfig.validate()


def _param_draw(module_name: str, module: nn.Module, leaf: str, shape: tuple[int, ...],
                cfg: ModelConfig) -> tuple[str, float]:
    own = getattr(module, "own_init", None)  # modules whose init is not the configured method's
    if own == "norm":  # scales 1, biases 0, whatever the shape (the qk norm's weight is a matrix only by shape)
        return "fill", 0.0 if leaf == "bias" else 1.0
    if own is not None:
        return method_draw(own, cfg, shape)
    if leaf == "bias":
        return "fill", 0.0
    if leaf == "weight":
        if len(shape) == 1:
            return "fill", 1.0
        residual = module_name.endswith(RESIDUAL_OUTPUTS)
        return method_draw(cfg.output_layer_init_method if residual else cfg.init_method, cfg, shape)
    raise InitError(f"{module_name}.{leaf}: neox/model/init.py has no initialisation rule for this parameter")


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def tile_seed(seed: int, tile: int) -> int:
    return _mix32((seed + tile) & _MASK32)


def default_init_seed() -> int:
    """torch.initial_seed() (the last torch.manual_seed's), folded to the 32 bits torch's CPU generator keeps."""
    seed = torch.initial_seed()
    return (seed ^ (seed >> 32)) & _MASK32


def _bounds(index: Index | None, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    if index is None:
        return [(0, size) for size in shape]
    if len(index) != len(shape):
        raise InitError(f"index {index} does not fit a parameter of shape {shape}")
    bounds = []
    for part, size in zip(index, shape):
        start, stop, step = part.indices(size)
        if step != 1:
            raise InitError(f"index {index}: only contiguous blocks are drawn")
        bounds.append((start, max(start, stop)))
    return bounds


@dataclass(frozen=True)
class InitPlan:
    """Every parameter's Draw (by single-device name) and the model's seed: any block of any initial value."""

    seed: int
    draws: Mapping[str, Draw]

    def value(self, name: str, index: Index | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A new tensor: the block `index` (one slice per dim, None: all) of the parameter's initial value."""
        shape = tuple(hi - lo for lo, hi in _bounds(index, self.draws[name].shape))
        return self.fill_(name, torch.empty(shape, dtype=dtype), index)

    @torch.no_grad()
    def fill_(self, name: str, out: torch.Tensor, index: Index | None = None) -> torch.Tensor:
        """Write the block `index` of the parameter's initial value into out (of the block's shape)."""
        draw = self.draws[name]
        bounds = _bounds(index, draw.shape)
        if tuple(out.shape) != tuple(hi - lo for lo, hi in bounds):
            raise InitError(f"{name}: a block {bounds} of {draw.shape} does not fit a tensor of {tuple(out.shape)}")
        if draw.kind == "fill":
            return out.fill_(draw.value)
        generator = torch.Generator()
        if draw.kind == "orthogonal":
            return self._fill_orthogonal(draw, out, bounds, generator)
        sizes = draw.tile_shape
        tile = torch.empty(sizes, dtype=out.dtype)
        strides = [math.prod(draw.grid[d + 1:]) for d in range(len(draw.grid))]
        for coords in itertools.product(*(range(lo // t, -(-hi // t)) for (lo, hi), t in zip(bounds, sizes))):
            number = draw.first_tile + sum(c * s for c, s in zip(coords, strides))
            generator.manual_seed(tile_seed(self.seed, number))
            if draw.kind == "normal":
                tile.normal_(0.0, draw.value, generator=generator)
            else:
                tile.uniform_(-draw.value, draw.value, generator=generator)
            source, target = [], []
            for c, (lo, hi), t in zip(coords, bounds, sizes):
                first, last = max(lo, c * t), min(hi, (c + 1) * t)
                source.append(slice(first - c * t, last - c * t))
                target.append(slice(first - lo, last - lo))
            out[tuple(target)] = tile[tuple(source)]
        return out

    def _fill_orthogonal(self, draw: Draw, out: torch.Tensor, bounds: list[tuple[int, int]],
                         generator: torch.Generator) -> torch.Tensor:
        """A QR needs the whole matrix: drawn whole from its first tile's generator, then sliced; each matrix of a
        3-D stack from the first tile of its own."""
        if len(draw.shape) < 3:
            whole = torch.empty(draw.shape, dtype=out.dtype)
            generator.manual_seed(tile_seed(self.seed, draw.first_tile))
            nn.init.orthogonal_(whole, gain=draw.value, generator=generator)
            return out.copy_(whole[tuple(slice(lo, hi) for lo, hi in bounds)])
        per_matrix = math.prod(draw.grid[1:])
        (first, last), rows, cols = bounds
        for index in range(first, last):
            whole = torch.empty(draw.shape[1:], dtype=out.dtype)
            generator.manual_seed(tile_seed(self.seed, draw.first_tile + index * per_matrix))
            nn.init.orthogonal_(whole, gain=draw.value, generator=generator)
            out[index - first].copy_(whole[slice(*rows), slice(*cols)])
        return out


def init_plan(model: nn.Module, cfg: ModelConfig, seed: int) -> InitPlan:
    """The plan of a single-device GPTNeoX (any device, meta too): parameters in named_parameters() order, a shared
    one (tied head, num_unique_layers) under its first name."""
    draws: dict[str, Draw] = {}
    seen: set[int] = set()
    next_tile = 0
    for module_name, module in model.named_modules():
        for leaf, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            shape = tuple(param.shape)
            kind, value = _param_draw(module_name, module, leaf, shape, cfg)
            if kind != "fill" and len(shape) > 3:
                raise InitError(f"{module_name}.{leaf}: tiles are drawn for vectors, matrices and stacks of "
                                f"matrices, not {shape}")
            draw = Draw(kind, value, shape, next_tile)
            draws[f"{module_name}.{leaf}" if module_name else leaf] = draw
            next_tile += draw.tiles
    return InitPlan(seed, draws)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> InitPlan:
    """Matrices (linears, embeddings, head) by the configured methods; vectors: norm scales 1, biases 0. A meta
    parameter is left for neox/parallel/materialize.py, which draws only a rank's shard. Returns the plan."""
    plan = init_plan(model, cfg, seed)
    for name, param in model.named_parameters():
        if not param.is_meta:
            plan.fill_(name, param)
    return plan
