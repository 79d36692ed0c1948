"""The per-rank training program: `python -m neox.train --config RESOLVED.yml` (started by `deepy train`).

Data flows one way: resolved config -> runtime -> tokenizer -> datasets -> model -> DeepSpeed engine -> loop.
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neox.config.resolved import load_resolved
from neox.entrypoint import RankProgram, run_rank_program
from neox.config.errors import ConfigError
from neox.config.neox_config import NeoXConfig
from neox.data.errors import DataError
from neox.data.build import build_train_valid_test, split_num_samples
from neox.data.loader import build_loader, eval_consumed_samples
from neox.data.token_range import check_run_token_ids
from neox.model import GPTNeoX
from neox.parallel.engine import ParallelTrainEngine, is_model_parallel
from neox.parallel import layout_state
from neox.parallel.materialize import meta_model
from neox.parallel.runtime import Runtime, all_reduce_mean, barrier
from neox.parallel.rng import dropout_seed
from neox.parallel.topology import build_topology
from neox.tokenizer import TokenizerError, build_tokenizer
from neox.checkpoint.consolidated import is_consolidated, read_consolidated
from neox.train import checkpoint
from neox.train.flops import matmul_params, measure_peak_flops, train_flops_per_token
from neox.train.metrics import MetricsSinks, build_sinks
from neox.train.engine import TrainEngine
from neox.train import faults, rank_log
from neox.train.optimizer import OptimizerError
from neox.train.preemption import StopRequests, stop_request_path
from neox.train.rank_log import RankLog
from neox.train.schedule import LRSchedule, warmup_iters_from_fraction

# Model keys that change the parameter set; a checkpoint that differs in any of them cannot be loaded.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "pos_emb", "rotary_pct",
                     "norm", "gpt_j_residual", "activation", "intermediate_size", "expansion_factor",
                     "mlp_multiple_of", "use_bias_in_norms", "use_bias_in_attn_linear", "use_bias_in_mlp",
                     "no_weight_tying", "padded_vocab_size", "max_position_embeddings")


class TrainError(RuntimeError):
    pass


# Errors that mean "fix the config, the data or the checkpoint", reported without a traceback.
_INPUT_ERRORS = (TrainError, checkpoint.CheckpointError, ConfigError, DataError, TokenizerError, OptimizerError)


def _rank0_failed(failed: bool, runtime: Runtime) -> bool:
    """Collective: every rank learns whether rank 0 failed the step they all wait on (only rank 0's flag counts)."""
    if not torch.distributed.is_initialized():
        return failed
    flag = torch.tensor([1 if failed and runtime.rank == 0 else 0], dtype=torch.int32, device=runtime.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Progress:
    """Everything besides engine state that a resumed run needs: the loop position and the data cursors."""
    iteration: int = 0
    consumed_train_samples: int = 0
    evaluations_done: int = 0

    def client_state(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    def __init__(self, cfg: NeoXConfig, config_path: Path, runtime: Runtime):
        self.cfg, self.config_path, self.rt = cfg, config_path, runtime
        train = cfg.train
        self.micro_batch = train.train_micro_batch_size_per_gpu
        self.grad_accum = train.gradient_accumulation_steps
        self.global_batch = train.train_batch_size
        # dp x tp x pp process groups; tp ranks of one dp replica read the same micro-batches.
        self.topo = build_topology(cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size)
        self.dp_rank, self.dp_size = self.topo.dp_rank, self.topo.dp_size
        self.seq_length = cfg.model.seq_length

        seed_all(train.seed)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
        # A checkpoint of another architecture is refused before any data or model is built.
        self.load_tag = self._checkpoint_to_load(Path(train.load)) if train.load else None
        self.train_ds, self.valid_ds, self.test_ds = self._datasets()
        # Identical initial weights on every rank come from the shared seed (DeepSpeed also broadcasts them).
        from_consolidated = bool(train.load and train.finetune and is_consolidated(train.load))
        if is_model_parallel(self.topo) and not from_consolidated:
            # Structure only: ParallelTrainEngine gives each rank its shard of these same initial values.
            model = meta_model(cfg.model)
        else:
            model = GPTNeoX(cfg.model)
        if from_consolidated:
            self._load_consolidated(model, Path(train.load))
        self.num_params = sum(p.numel() for p in model.parameters())
        if is_model_parallel(self.topo):
            self.train_engine = ParallelTrainEngine(cfg, model, runtime.device, self.topo)
        else:
            self.train_engine = TrainEngine(cfg, model, runtime.device)
        self.engine = self.train_engine.engine
        decay_iters = cfg.optim.lr_decay_iters or train.train_iters
        self.schedule = LRSchedule(max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                   warmup_iters=warmup_iters_from_fraction(cfg.optim.warmup, decay_iters),
                                   decay_iters=decay_iters, decay_style=cfg.optim.lr_decay_style)
        self.progress = Progress()
        self.fault = faults.from_environment()  # None unless a failure test asks for one
        if self.load_tag is not None:
            self._load(Path(train.load), self.load_tag)
        # Dropout streams differ per data-parallel rank, after the identical initialisation above. A resumed run
        # has restored them instead; `load` naming a still-empty directory (save == load) is a fresh run.
        if self.load_tag is None or train.finetune:
            torch.manual_seed(dropout_seed(train.seed, self.topo))
        self.owns_metrics = runtime.rank == 0
        self.sinks: MetricsSinks | None = None
        if self.owns_metrics:
            self.sinks = build_sinks(cfg.log.log_dir, cfg.log.tensorboard_dir,
                                     cfg.log.active_wandb_project(),
                                     run_name=Path(cfg.train.save or cfg.log.log_dir or ".").name,
                                     run_config={"config": str(config_path)})
        self.flops_per_token = train_flops_per_token(
            matmul_params(self.num_params, cfg.model.padded_vocab_size, cfg.model.hidden_size,
                          tied_head=not cfg.model.no_weight_tying,
                          learned_pos_rows=cfg.model.max_positions if cfg.model.pos_emb == "learned" else 0),
            cfg.model.num_layers, cfg.model.hidden_size, self.seq_length)
        self.peak_flops = cfg.log.peak_flops or self._measured_peak()

    # --- set-up pieces -------------------------------------------------------------------------------------

    def _datasets(self):
        cfg, train = self.cfg, self.cfg.train
        num_samples = split_num_samples(train.train_iters, train.eval_interval, train.eval_iters, self.global_batch)
        labels = None
        if cfg.data.label_data_paths:
            labels = dict(zip(cfg.data.train_data_paths or [], cfg.data.label_data_paths))

        def build():
            return build_train_valid_test(
                data_path=cfg.data.data_path, train_data_paths=cfg.data.train_data_paths,
                valid_data_paths=cfg.data.valid_data_paths, test_data_paths=cfg.data.test_data_paths,
                train_data_weights=cfg.data.train_data_weights, valid_data_weights=cfg.data.valid_data_weights,
                test_data_weights=cfg.data.test_data_weights, label_data_paths=labels, split=cfg.data.split,
                seq_length=self.seq_length, seed=train.seed, num_samples=num_samples,
                cache_dir=cfg.data.data_cache_dir)

        # Rank 0 builds the index caches first; the others then load them (the cache also locks, this only
        # keeps N ranks from queueing on the lock while one builds). Rank 0 tells the others whether it succeeded:
        # bad data then stops every rank with a message, instead of a peer's broken-barrier traceback.
        if self.rt.rank == 0:
            try:
                # deepy checked this before launching; a launch by other means (or from a login node) has not.
                check_run_token_ids(cfg.data, self.tokenizer.vocab_size)
                datasets = build()
            except Exception:
                _rank0_failed(True, self.rt)
                raise
            _rank0_failed(False, self.rt)
            return datasets
        if _rank0_failed(False, self.rt):
            raise TrainError("rank 0 could not build the datasets; its error message says what to fix")
        return build()

    def _untouched_rng(self):
        """Run a block without advancing this rank's RNG streams, which only the training steps may draw from:
        a resumed run restores them at the checkpoint and must then see the very draws the uninterrupted run saw,
        so nothing that happens only at start-up (peak probe, new data iterators) may consume them."""
        return torch.random.fork_rng(devices=[self.rt.device] if self.rt.is_cuda else [])

    def _measured_peak(self) -> float:
        with self._untouched_rng():
            dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.optim.precision, torch.float32)
            local = measure_peak_flops(dtype=dtype, device=self.rt.device)
        return float(all_reduce_mean(torch.tensor(local, dtype=torch.float64)))

    def _checkpoint_to_load(self, load_dir: Path) -> str | None:
        if is_consolidated(load_dir):
            # Weights only (an imported or exported model): they go into the model before the engine is built.
            if not self.cfg.train.finetune:
                raise TrainError(f"{load_dir} is a consolidated model (weights only, no optimizer state): set "
                                 "'finetune: true' to start training from it")
            saved_cfg = load_resolved(load_dir / "config.yml")
            checkpoint.check_same_architecture(dataclasses.asdict(saved_cfg.model),
                                               dataclasses.asdict(self.cfg.model), ARCHITECTURE_KEYS, load_dir)
            return None
        tag = checkpoint.resolve_load_tag(load_dir)
        if tag is None:
            if self.cfg.train.finetune:
                raise TrainError(f"finetune is set but {load_dir} holds no complete checkpoint")
            return None  # a fresh run whose save == load directory: nothing to resume yet
        saved_cfg = load_resolved(load_dir / tag / "config.yml")
        checkpoint.check_same_architecture(dataclasses.asdict(saved_cfg.model), dataclasses.asdict(self.cfg.model),
                                           ARCHITECTURE_KEYS, load_dir / tag)
        return tag

    def _load_consolidated(self, model: GPTNeoX, load_dir: Path) -> None:
        _, weights = read_consolidated(load_dir)
        model.load_state_dict(weights, strict=True)
        if self.rt.rank == 0:
            print(f"loaded consolidated model {load_dir}: weights only (finetune)", flush=True)

    def _load(self, load_dir: Path, tag: str) -> None:
        saved_layout = layout_state.layout_of(load_resolved(load_dir / tag / "config.yml"))
        if saved_layout != layout_state.layout_of(self.cfg):
            state = self._load_other_layout(load_dir / tag, saved_layout)
        else:
            state = checkpoint.load(self.engine, load_dir, tag, self.rt.rank, finetune=self.cfg.train.finetune)
        if not self.cfg.train.finetune:
            self.progress = Progress(**{k: state[k] for k in dataclasses.asdict(Progress())})
        if self.rt.rank == 0:
            mode = "weights only (finetune)" if self.cfg.train.finetune else f"resuming at iteration {self.progress.iteration}"
            print(f"loaded checkpoint {load_dir / tag}: {mode}", flush=True)

    def _load_other_layout(self, ckpt_dir: Path, saved_layout: dict) -> dict:
        """Resume (or finetune) from a checkpoint written at another tp/pp/dp/ZeRO layout."""
        finetune = self.cfg.train.finetune
        full = layout_state.read_layout_free_state(ckpt_dir)
        layout_state.load_layout_free_state(self.engine, layout_state.param_names_of(self.train_engine), self.topo,
                                            full, weights_only=finetune)
        if self.rt.rank == 0:
            print(f"{ckpt_dir} was written at {saved_layout}; loaded its layout-free state at "
                  f"{layout_state.layout_of(self.cfg)}", flush=True)
        if finetune:
            return {}
        iteration = full.client_state["iteration"]
        self.engine.global_steps = iteration
        self.engine.global_samples = full.client_state["consumed_train_samples"]
        # Per-rank RNG files belong to the old ranks: dropout streams restart, seeded by dp rank and step.
        torch.manual_seed(dropout_seed(self.cfg.train.seed, self.topo) + 7919 * iteration)
        return full.client_state

    def _loader(self, dataset, consumed: int):
        # torch's DataLoader draws a worker base seed from the global torch RNG each time an iterator is made; a
        # resumed run makes its train iterator at the checkpoint's step, the uninterrupted run does not.
        with self._untouched_rng():
            return build_loader(dataset, consumed_samples=consumed, micro_batch_size=self.micro_batch,
                                global_batch_size=self.global_batch, dp_rank=self.dp_rank,
                                dp_size=self.dp_size, eod_token=self.tokenizer.eod,
                                eod_mask_loss=self.cfg.data.eod_mask_loss, num_workers=self.cfg.data.num_workers)

    # --- the loop ------------------------------------------------------------------------------------------

    def _micro_loss(self, batch) -> torch.Tensor:
        return self.train_engine.micro_loss(batch)

    def train_step(self, data_iter) -> tuple[float, float | None]:
        rank_loss, grad_norm = self.train_engine.step(data_iter, self.grad_accum,
                                                      self.schedule.lr_at(self.progress.iteration))
        mean_loss = all_reduce_mean(rank_loss)
        self.progress.iteration += 1
        self.progress.consumed_train_samples += self.global_batch
        return float(mean_loss), (None if grad_norm is None else float(grad_norm))

    @torch.no_grad()
    def evaluate(self, dataset, consumed: int, iters: int) -> float:
        self.engine.eval()
        data_iter = self._loader(dataset, consumed)
        if isinstance(self.train_engine, ParallelTrainEngine):
            losses = [self.train_engine.eval_loss(data_iter, iters, self.grad_accum)]
        else:
            losses = [self._micro_loss(next(data_iter)) for _ in range(iters * self.grad_accum)]
        self.engine.train()
        return float(all_reduce_mean(torch.stack(losses).mean().float()))

    def validate(self) -> dict:
        train = self.cfg.train
        consumed = eval_consumed_samples(self.progress.evaluations_done, train.eval_iters, self.global_batch)
        loss = self.evaluate(self.valid_ds, consumed, train.eval_iters)
        self.progress.evaluations_done += 1
        return {"iteration": self.progress.iteration, "valid_loss": loss, "valid_ppl": _ppl(loss)}

    def save(self) -> None:
        train = self.cfg.train
        run_files = checkpoint.RunFiles(self.config_path, tuple(self.tokenizer.files()))
        # Besides DeepSpeed's layout-bound files, a layout-free copy lets any (tp, pp, dp, ZeRO) layout resume.
        client_state = self.progress.client_state()
        if self.rt.rank == 0:
            print(f"saving checkpoint {checkpoint.tag_for(self.progress.iteration)}", flush=True)

        def write_layout_free(ckpt_dir: Path) -> None:
            layout_state.save_layout_free_state(ckpt_dir, self.engine, layout_state.param_names_of(self.train_engine),
                                                self.topo, client_state)

        # Without it (checkpoint_layout_free: false) tools/reshard_checkpoint.py rebuilds it offline when needed.
        path = checkpoint.save(self.engine, Path(train.save), self.progress.iteration, client_state,
                               run_files, self.rt.rank, barrier, keep_last=train.keep_last_n_checkpoints,
                               write_extra=write_layout_free if train.checkpoint_layout_free else None)
        if self.rt.rank == 0:
            print(f"saved checkpoint {path}", flush=True)

    def run(self, stop: StopRequests | None = None) -> bool:
        """Train to train_iters; True if a preemption request stopped it earlier (after a checkpoint)."""
        cfg, train, log = self.cfg, self.cfg.train, self.cfg.log
        if self.progress.iteration >= train.train_iters:
            print(f"nothing to do: checkpoint is at iteration {self.progress.iteration} >= train_iters", flush=True)
            return False
        self.engine.train()
        data_iter = self._loader(self.train_ds, self.progress.consumed_train_samples)
        start = time.perf_counter()
        window_start, window_steps, window_losses = time.perf_counter(), 0, []
        last_saved = self.progress.iteration
        while self.progress.iteration < train.train_iters:
            loss, grad_norm = self.train_step(data_iter)
            window_steps += 1
            window_losses.append(loss)
            it = self.progress.iteration
            if it % log.log_interval == 0 or it == train.train_iters:
                elapsed = time.perf_counter() - window_start
                self._log(self._train_record(window_losses, grad_norm, elapsed / window_steps,
                                             time.perf_counter() - start))
                window_start, window_steps, window_losses = time.perf_counter(), 0, []
            if self.valid_ds is not None and train.eval_iters > 0 and it % train.eval_interval == 0:
                self._log(self.validate())
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if train.save and train.save_interval and it % train.save_interval == 0:
                self.save()
                last_saved = it
                window_start = time.perf_counter()
            if self.fault is not None:
                self.fault.after_step(self.rt.rank, it)
            # Every rank takes part, every step (one all-reduce of a flag): they all stop after the same step.
            if stop is not None and it < train.train_iters and stop.agreed():
                return self._stop_for_preemption(last_saved)
        if train.save and last_saved != self.progress.iteration:
            self.save()
        if self.test_ds is not None and train.eval_iters > 0:
            loss = self.evaluate(self.test_ds, 0, train.eval_iters)
            self._log({"iteration": self.progress.iteration, "test_loss": loss, "test_ppl": _ppl(loss)})
        return False

    def _stop_for_preemption(self, last_saved: int) -> bool:
        it = self.progress.iteration
        if self.cfg.train.save and last_saved != it:
            self.save()
        if self.rt.rank == 0:
            where = f"checkpoint {checkpoint.tag_for(it)} is written" if self.cfg.train.save else \
                "no checkpoint: 'save' is not set, a relaunch starts over"
            print(f"preempted: stopped after iteration {it} of {self.cfg.train.train_iters}; {where}; exit code "
                  f"{self.cfg.train.preempt_exit_code} asks for a requeue (relaunch with load = save to resume)",
                  flush=True)
        return True

    def _train_record(self, losses: list[float], grad_norm: float | None, step_time: float, elapsed: float) -> dict:
        tokens_per_sec = self.global_batch * self.seq_length / step_time
        flops_per_rank = self.flops_per_token * tokens_per_sec / self.rt.world_size
        return {
            "iteration": self.progress.iteration,
            "lm_loss": sum(losses) / len(losses),
            "lr": self.schedule.lr_at(self.progress.iteration - 1),
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "tokens_per_sec_per_rank": tokens_per_sec / self.rt.world_size,
            "samples_per_sec": self.global_batch / step_time,
            "tflops": flops_per_rank * self.rt.world_size / 1e12,
            "tflops_per_rank": flops_per_rank / 1e12,
            "mfu": flops_per_rank / self.peak_flops,
            "step_time_s": step_time,
            "consumed_samples": self.progress.consumed_train_samples,
            "elapsed_s": elapsed,
        }

    def _log(self, record: dict) -> None:
        if self.sinks is not None:
            self.sinks.write(record)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _train(cfg: NeoXConfig, config_path: Path, runtime: Runtime) -> int:
    run_dir = config_path.parent  # where deepy wrote the resolved config: {save or log_dir}
    stop = StopRequests(stop_request_path(run_dir) if runtime.local_rank == 0 else None, runtime.device)
    stop.install()
    with RankLog(rank_log.ranks_dir(cfg.log.log_dir, run_dir), runtime.rank) as log:
        trainer = Trainer(cfg, config_path, runtime)
        try:
            preempted = trainer.run(stop)
        finally:
            trainer.close()
        log.exit_code = cfg.train.preempt_exit_code if preempted else 0
    return log.exit_code


PROGRAM = RankProgram(module="neox.train", launch_command="deepy train", description=__doc__.splitlines()[0],
                      body=_train, input_errors=_INPUT_ERRORS)


def main(argv: list[str] | None = None) -> int:
    return run_rank_program(PROGRAM, argv)


if __name__ == "__main__":
    sys.exit(main())
