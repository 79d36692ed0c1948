"""Every derived value, computed in this one place.

world_size = ranks per node summed over nodes: num_gpus x num_nodes, or the hostfile's slots (after
include/exclude/num_nodes), or -- with neither -- every local GPU, and 1 rank on a machine without GPU.
data_parallel_size = world_size / (model_parallel_size x pipeline stages); train_batch_size = micro batch x
gradient accumulation x data_parallel_size (any two give the third); padded vocab = the tokenizer's vocab
rounded up to make_vocab_size_divisible_by x model_parallel_size; lr_decay_iters defaults to
floor(train_iters x lr_decay_fraction), else train_iters; iteration and eval_iteration mirror each other;
precision follows fp16.enabled / bf16.enabled when unset.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

from neox.config.errors import ConfigError
from neox.config.launch import LaunchConfig
from neox.config.neox_config import NeoXConfig
from neox.config.optim import sections_precision


def derive(cfg: NeoXConfig, *, vocab_size: int | None = None, local_gpus: int | None = None) -> None:
    """Fill the derived values of cfg in place and record 'derived: <rule>' as their provenance."""
    _derive_launcher(cfg)
    hosts = resolve_hosts(cfg.launch, local_gpus)
    world = sum(hosts.values())
    if cfg.launch.global_num_gpus is not None and cfg.launch.global_num_gpus != world:
        if cfg.launch.hostfile is not None or cfg.launch.num_gpus is not None:
            raise ConfigError(
                f"'global_num_gpus' is {cfg.launch.global_num_gpus} but 'num_gpus' / 'num_nodes' / 'hostfile' give "
                f"{world} ranks; remove one of them or make them agree"
            )
        world = cfg.launch.global_num_gpus  # a hypothetical job (plan, show-config); a launch checks it again
    _set(cfg, "derived", "world_size", world, "ranks per node summed over nodes")
    _set(cfg, "derived", "node_count", len(hosts), "nodes in use")
    dp = data_parallel_size(world, cfg.parallel.model_parallel_size, cfg.parallel.pipe_stages)
    _set(cfg, "derived", "data_parallel_size", dp, "world_size / (model_parallel_size x pipe stages)")

    t = cfg.train
    if t.train_micro_batch_size_per_gpu is None and t.train_batch_size is None:
        # No batch at all: a config for eval, generate or a converted model; training asks for one
        # (validate.require_for_training), and gradient_accumulation_steps alone says nothing yet.
        _derive_rest(cfg, vocab_size)
        return
    micro, accum, total = batch_sizes(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps,
                                      t.train_batch_size, dp)
    rule = "train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x data_parallel_size"
    accum_is_default = t.gradient_accumulation_steps is None and (
        t.train_batch_size is None or t.train_micro_batch_size_per_gpu is None
    )
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                       ("train_batch_size", total)):
        if getattr(t, key) is None:
            _set(cfg, "train", key, value, rule)
    if accum_is_default:
        cfg.provenance["gradient_accumulation_steps"] = "default"
    _derive_rest(cfg, vocab_size)


def _derive_rest(cfg: NeoXConfig, vocab_size: int | None) -> None:
    t = cfg.train
    if cfg.optim.lr_decay_iters is None and t.train_iters is not None:
        if cfg.optim.lr_decay_fraction is not None:
            _set(cfg, "optim", "lr_decay_iters", max(1, math.floor(t.train_iters * cfg.optim.lr_decay_fraction)),
                 "= floor(train_iters x lr_decay_fraction), at least 1")
        else:
            _set(cfg, "optim", "lr_decay_iters", max(1, t.train_iters), "= train_iters, at least 1")
    _derive_iteration(cfg)
    if cfg.optim.precision is None:
        _set(cfg, "optim", "precision", precision_from_sections(cfg.optim.fp16, cfg.optim.bf16),
             "from fp16.enabled / bf16.enabled")

    if vocab_size is not None:
        padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                                   cfg.parallel.model_parallel_size)
        given = cfg.model.padded_vocab_size
        if given is None:
            _set(cfg, "model", "padded_vocab_size", padded,
                 f"tokenizer vocab {vocab_size} rounded up to make_vocab_size_divisible_by x model_parallel_size")
        elif given < vocab_size or given % cfg.parallel.model_parallel_size:
            raise ConfigError(
                f"'padded_vocab_size' ({given}) must be >= the tokenizer's vocab size ({vocab_size}) and divisible "
                f"by 'model_parallel_size' ({cfg.parallel.model_parallel_size}); remove it to get {padded}"
            )


def _derive_iteration(cfg: NeoXConfig) -> None:
    """eval_iteration (ours) and iteration (gpt-neox's) name the same checkpoint step."""
    train_it, eval_it = cfg.train.iteration, cfg.eval.eval_iteration
    if train_it is not None and eval_it is not None and train_it != eval_it:
        raise ConfigError(f"'iteration' ({train_it}) and 'eval_iteration' ({eval_it}) both pick the checkpoint to "
                          "load; keep one")
    if train_it is None and eval_it is not None:
        _set(cfg, "train", "iteration", eval_it, "= eval_iteration")
    elif eval_it is None and train_it is not None:
        _set(cfg, "eval", "eval_iteration", train_it, "= iteration")


def _derive_launcher(cfg: NeoXConfig) -> None:
    """gpt-neox's deepspeed_slurm / deepspeed_mpi: ranks come from srun / mpirun, always through the multi-node path.
    A hostfile that does not exist means this machine alone, as DeepSpeed's launcher (and so gpt-neox) has it."""
    launch = cfg.launch
    if launch.hostfile is not None and not Path(launch.hostfile).exists():
        if launch.num_nodes > 1:
            raise ConfigError(f"'hostfile' {launch.hostfile} does not exist and 'num_nodes' asks for {launch.num_nodes} "
                              "nodes: write the hostfile ('HOST slots=N' per node) or drop num_nodes")
        _note_once(f"hostfile {launch.hostfile} not found: running on this machine only (as DeepSpeed does)")
        _set(cfg, "launch", "hostfile", None, f"{launch.hostfile} does not exist: this machine only")
    for flag, launcher in (("deepspeed_slurm", "slurm"), ("deepspeed_mpi", "openmpi")):
        if getattr(launch, flag):
            if launch.launcher == "pdsh":
                _set(cfg, "launch", "launcher", launcher, f"{flag} is true")
            if not launch.force_multi:
                _set(cfg, "launch", "force_multi", True, f"{flag} is true")


_noted: set[str] = set()  # deepy derives a config more than once; each note is printed once


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        logging.getLogger("neox.config").warning("%s", message)


def _set(cfg: NeoXConfig, group: str, key: str, value: object, rule: str) -> None:
    setattr(getattr(cfg, group), key, value)
    cfg.provenance[key] = f"derived: {rule}"


def detect_local_gpus() -> int:
    import torch  # deferred: reading a config should not pay for torch unless it must count GPUs

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def data_parallel_size(world_size: int, model_parallel_size: int, pipe_stages: int) -> int:
    per_replica = model_parallel_size * pipe_stages
    if world_size % per_replica:
        raise ConfigError(
            f"world size {world_size} (from 'num_gpus' x 'num_nodes' or the 'hostfile') is not divisible by "
            f"'model_parallel_size' x 'pipe_parallel_size' = {model_parallel_size} x {pipe_stages}; "
            "change the number of ranks or the parallel sizes"
        )
    return world_size // per_replica


def batch_sizes(micro: int | None, accum: int | None, total: int | None, dp: int) -> tuple[int, int, int]:
    """(micro, accum, total) with total = micro x accum x dp; any two determine the third, accum defaults to 1."""
    if micro is not None and accum is not None:
        if total is not None and total != micro * accum * dp:
            raise ConfigError(
                f"'train_batch_size' ({total}) != 'train_micro_batch_size_per_gpu' ({micro}) x "
                f"'gradient_accumulation_steps' ({accum}) x data_parallel_size ({dp}) = {micro * accum * dp}; "
                "set at most two of the three, or make them agree"
            )
        return micro, accum, micro * accum * dp
    if total is None:
        if micro is None:
            raise ConfigError("set 'train_micro_batch_size_per_gpu' (or 'train_batch_size')")
        return micro, 1, micro * dp
    if micro is None and accum is None:
        accum = 1
    if micro is None:
        micro, rest = divmod(total, accum * dp)
        solved, rule = micro, f"{accum} x {dp}"
    else:
        accum, rest = divmod(total, micro * dp)
        solved, rule = accum, f"{micro} x {dp}"
    if rest or solved < 1:
        raise ConfigError(
            f"'train_batch_size' ({total}) is not a multiple of the other batch keys x data_parallel_size "
            f"({rule}); with data_parallel_size {dp}, pick a train_batch_size divisible by it"
        )
    return micro, accum, total


def padded_vocab_size(vocab_size: int, divisible_by: int, model_parallel_size: int) -> int:
    multiple = divisible_by * model_parallel_size
    return -(-vocab_size // multiple) * multiple


def adopt_padded_vocab_size(cfg: NeoXConfig, checkpoint_padded: int, vocab_size: int, checkpoint: str) -> bool:
    """A run loading a checkpoint keeps the checkpoint's padded vocabulary when it derived (not pinned) its own
    and model_parallel_size splits the checkpoint's evenly: the weights then load as saved. True if adopted."""
    derived = cfg.provenance.get("padded_vocab_size", "").startswith("derived:")
    if (not derived or checkpoint_padded == cfg.model.padded_vocab_size or checkpoint_padded < vocab_size
            or checkpoint_padded % cfg.parallel.model_parallel_size):
        return False
    _set(cfg, "model", "padded_vocab_size", checkpoint_padded,
         f"adopted from checkpoint {checkpoint} (model_parallel_size {cfg.parallel.model_parallel_size} divides it)")
    return True


def precision_from_sections(fp16: dict | None, bf16: dict | None) -> str:
    """fp16 / bf16 from the enabled section (fp16 with type bfloat16 is bf16, as DeeperSpeed reads it), else fp32."""
    return sections_precision(fp16 or {}, bf16 or {}) or "fp32"


def read_hostfile(path: Path) -> OrderedDict[str, int]:
    """DeepSpeed's hostfile format: 'HOST slots=N' per line, '#' comments."""
    hosts: OrderedDict[str, int] = OrderedDict()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"'hostfile' {path} cannot be read: {err.strerror or err}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ConfigError(f"{path}:{number}: hostfile lines are 'HOST slots=N', got {raw.strip()!r}")
        if parts[0] in hosts:
            raise ConfigError(f"{path}:{number}: host {parts[0]} is listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise ConfigError(f"'hostfile' {path} lists no host")
    return hosts


def resolve_hosts(launch: LaunchConfig, local_gpus: int | None) -> OrderedDict[str, int]:
    """Host -> ranks on it, as DeepSpeed's runner will pick them. local_gpus None: count them if needed."""
    if launch.hostfile is not None:
        pool = read_hostfile(Path(launch.hostfile))
    else:
        if launch.num_nodes > 1:
            raise ConfigError(f"'num_nodes' {launch.num_nodes} needs a 'hostfile' listing the nodes")
        if local_gpus is None and (launch.num_gpus is None or launch.include or launch.exclude):
            local_gpus = detect_local_gpus()
        if local_gpus and launch.num_gpus is not None and launch.num_gpus > local_gpus:
            raise ConfigError(f"'num_gpus' is {launch.num_gpus} but this machine has {local_gpus} GPU(s)")
        pool = OrderedDict(localhost=local_gpus if local_gpus else 1)
    slots = OrderedDict((host, list(range(n))) for host, n in pool.items())
    if launch.include:
        slots = _filter(slots, launch.include, keep=True)
    elif launch.exclude:
        slots = _filter(slots, launch.exclude, keep=False)
    if launch.num_nodes > 0:
        if launch.num_nodes > len(slots):
            raise ConfigError(f"'num_nodes' is {launch.num_nodes} but the 'hostfile' lists {len(slots)} host(s)")
        slots = OrderedDict(list(slots.items())[: launch.num_nodes])
    hosts = OrderedDict((host, len(s)) for host, s in slots.items() if s)
    if launch.num_gpus is not None:
        hosts = OrderedDict((host, launch.num_gpus) for host in hosts)
    if not hosts:
        raise ConfigError("'include'/'exclude' leave no host to run on")
    return hosts


def _filter(slots: OrderedDict[str, list[int]], spec: str, *, keep: bool) -> OrderedDict[str, list[int]]:
    key = "include" if keep else "exclude"
    chosen: dict[str, list[int] | None] = {}
    for part in spec.split("@"):
        host, _, slot_text = part.partition(":")
        if host not in slots:
            raise ConfigError(f"'{key}' names host {host!r}, which is not among {', '.join(slots)}")
        try:
            wanted = [int(s) for s in slot_text.split(",")] if slot_text else None
        except ValueError:
            raise ConfigError(f"'{key}' is 'HOST[:SLOT,...]@...', got {spec!r}") from None
        for slot in wanted or []:
            if slot not in slots[host]:
                raise ConfigError(f"'{key}' names slot {slot} of {host}, which has slots {slots[host]}")
        chosen[host] = wanted
    out: OrderedDict[str, list[int]] = OrderedDict()
    for host, available in slots.items():
        if host not in chosen:
            out[host] = [] if keep else available
        elif keep:
            out[host] = available if chosen[host] is None else sorted(set(chosen[host]))
        else:
            out[host] = [] if chosen[host] is None else [s for s in available if s not in chosen[host]]
    return out
