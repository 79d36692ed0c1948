"""The per-rank training program: `python -m neox.train --config RESOLVED.yml` (started by `deepy train`).

Data flows one way: resolved config -> runtime -> tokenizer -> datasets -> model -> DeepSpeed engine -> loop.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from neox.config.resolved import load_resolved
from neox.entrypoint import RankProgram, run_rank_program
from neox.config.curriculum import curriculum_enabled
from neox.config.errors import ConfigError
from neox.config.lora import lora_settings
from neox.config.neox_config import NeoXConfig
from neox.data.errors import DataError
from neox.data.build import datasets_from_config, is_index_builder, split_num_samples
from neox.data.char_count import char_level_ppl, eval_text_counts
from neox.data.loader import MicroBatchSampler, build_loader, eval_consumed_samples
from neox.data.token_range import check_run_token_ids
from neox.model import GPTNeoX
from neox.model.moe import inactive_params
from neox.model.value_head import is_reward_model, lm_weights_for_reward_model
from neox.parallel import rank_status
from neox.parallel.runtime import Runtime, all_reduce_mean, barrier
from neox.parallel.rng import dropout_seed
from neox.parallel.topology import topology_for
from neox.tokenizer import TokenizerError, build_tokenizer
from neox.checkpoint.consolidated import is_consolidated, read_consolidated
from neox.checkpoint.gpt_neox import GptNeoxCheckpoint, open_gpt_neox_checkpoint
from neox.checkpoint import engine_state, layout_state, s3_upload, vocab_padding
from neox.checkpoint import load_folder
from neox.checkpoint.async_save import CheckpointSaver
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.lora_base import write_base_record
from neox.train import epochs, forward_check
from neox.train.curriculum import SeqlenWarmup
from neox.train.flops import matmul_params, measure_peak_flops, mfu_peak, train_flops_per_token
from neox.train.moe_metrics import MoEMetrics
from neox.train.metrics import MetricsSinks, flat_run_config, shared_wandb_group, sinks_for_run
from neox.train.diagnostics import build_diagnostics
from neox.train.profiling import build_step_profiler
from neox.train.engine import build_train_engine, initial_model
from neox.train.objectives import build_objective, window_means
from neox.train.lora_model import build_lora_model, lora_base_dir
from neox.train import faults, mup_modes, rank_log
from neox.train.rank_log import RankLog
from neox.optim import OptimizerError
from neox.train.preemption import StopRequests, stop_request_path
from neox.train.save_schedule import schedule_from_config
from neox.train.schedule import (LRSchedule, ScheduleMismatch, decay_iters_for, resume_schedule,
                                 warmup_iters_from_fraction)

# Model keys that change the parameter set; a checkpoint that differs in any of them cannot be loaded.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "pos_emb", "rotary_pct",
                     "norm", "gpt_j_residual", "activation", "intermediate_size", "expansion_factor",
                     "mlp_multiple_of", "use_bias_in_norms", "use_bias_in_attn_linear", "use_bias_in_mlp",
                     "no_weight_tying", "padded_vocab_size", "max_position_embeddings", "use_qk_layernorm",
                     "num_unique_layers", "param_sharing_style", "gpt_j_tied", "rpe_num_buckets",
                     "moe_num_experts", "moe_expert_interval", "moe_layers", "moe_intermediate_size",
                     "moe_num_shared_experts", "moe_shared_expert_gate", "moe_shared_expert_intermediate_size")


class TrainError(RuntimeError):
    pass


# Errors that mean "fix the config, the data or the checkpoint", reported without a traceback.
_INPUT_ERRORS = (TrainError, CheckpointError, ConfigError, DataError, TokenizerError, OptimizerError,
                 s3_upload.S3UploadError)


def _any_builder_failed(failed: bool, runtime: Runtime) -> bool:
    """Collective: every rank learns whether any rank that builds the index caches failed."""
    if not torch.distributed.is_initialized():
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=runtime.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Client-state key of the LR schedule's settings, which a resume checks against the config (gpt-neox's rule).
SCHEDULE_STATE_KEY = "lr_schedule"


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
        self.topo = topology_for(cfg.parallel)
        self.dp_rank, self.dp_size = self.topo.dp_rank, self.topo.dp_size
        self.seq_length = cfg.model.seq_length
        if train.train_epochs is not None:
            # A run of this config (not the config itself) gets train_iters from the data, as gpt-neox does.
            cfg = self.cfg = self._with_epoch_iterations(cfg)
            train = cfg.train

        seed_all(train.seed)
        # First, so that on GPU the CUDA allocator history (memory_profiling) covers the model's set-up.
        self.profiler = build_step_profiler(cfg.log, runtime.rank, runtime.device, config_path.parent)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
        # A checkpoint of another architecture is refused before any data or model is built.
        self.repad: vocab_padding.Repad | None = None  # set when the checkpoint's vocabulary padding differs
        self.gpt_neox: GptNeoxCheckpoint | None = None  # set when `load` is a checkpoint EleutherAI's gpt-neox wrote
        self.load_tag = self._checkpoint_to_load(Path(train.load)) if train.load else None
        rank_status.enter("building the datasets")
        self.train_ds, self.valid_ds, self.test_ds = self._datasets()
        # Evaluations read the validation set one after another: one reader serves them all, so its workers are
        # started (forked) once per run rather than at every evaluation.
        self._valid_reader: Iterator | None = None
        self.do_train = self._phase("do_train", self.train_ds is not None and train.train_iters > 0,
                                    "there is nothing to train (no train data, or train_iters 0)")
        self.do_valid = self._phase("do_valid", self.valid_ds is not None and train.eval_iters > 0,
                                    "there is no validation data (valid share of 'split' or 'valid_data_paths') "
                                    "or eval_iters is 0")
        self.do_test = self._phase("do_test", self.test_ds is not None and train.eval_iters > 0,
                                   "there is no test data (test share of 'split' or 'test_data_paths') or "
                                   "eval_iters is 0")
        # Identical initial weights on every rank come from the shared seed (DeepSpeed also broadcasts them).
        from_consolidated = bool(train.load and train.finetune and is_consolidated(train.load))
        from_consolidated = from_consolidated or self.gpt_neox is not None
        rank_status.enter("building the model and the DeepSpeed engine")
        self.lora = lora_settings(train.lora)
        self.lora_base: Path | None = None  # a LoRA run's frozen base, named in each of its checkpoints
        if self.lora is not None:
            model = self._lora_model()
        else:
            model = initial_model(cfg, value_head=is_reward_model(cfg), whole=from_consolidated)
        if from_consolidated and self.lora is None:
            self._load_consolidated(model, Path(train.load))
        self.num_params = sum(p.numel() for p in model.parameters())
        # The loss of train_impl (neox/train/objectives): a mean over the global batch's unmasked tokens/pairs/samples.
        self.objective = build_objective(cfg)
        self._window_metrics: list[dict[str, float]] = []  # the objective's metrics of the steps since the last log
        self.train_engine = build_train_engine(cfg, model, runtime.device, self.topo, self.objective)
        self.engine = self.train_engine.engine
        # MoE layers: their router losses and expert loads for each metrics line (None without MoE layers).
        self.moe_metrics = MoEMetrics.for_model(model, cfg.model, self.topo.tp_rank, runtime.device)
        # s3_path: rank 0 uploads each finished checkpoint in the background; close() waits for the uploads.
        self.s3 = s3_upload.uploader_for(train.s3_path, train.save, train.s3_chunk_size, runtime.rank)
        # checkpoint_async: saves are written in the background and completed at a later step (neox/checkpoint/
        # async_save.py); the run waits for the one in flight before the next save and before it ends.
        self.saver = CheckpointSaver(train.checkpoint_async, runtime.rank, barrier, runtime.device,
                                     self._checkpoint_complete, faults.checkpoint_write_delay())
        # gpt-neox's sequence-length warm-up (curriculum_learning): a step's batches are cut to the scheduled length.
        self.curriculum = (SeqlenWarmup(cfg.data.curriculum_learning, self.seq_length)
                           if curriculum_enabled(cfg.data.curriculum_learning) else None)
        decay_iters = decay_iters_for(cfg.optim.lr_decay_iters, cfg.optim.lr_decay_fraction, train.train_iters)
        self.schedule = LRSchedule(max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                   warmup_iters=warmup_iters_from_fraction(cfg.optim.warmup, decay_iters),
                                   decay_iters=decay_iters, decay_style=cfg.optim.lr_decay_style)
        # The iteration the LR schedule counts from: 0, or where a resume started a fresh optimizer and schedule.
        self.schedule_start = 0
        self.save_schedule = schedule_from_config(train)
        self.progress = Progress()
        self.fault = faults.from_environment()  # None unless a failure test asks for one
        if self.gpt_neox is not None and not train.finetune:
            self._resume_gpt_neox_position(self.gpt_neox.iteration)
        if self.load_tag is not None:
            self._load(Path(train.load), self.load_tag)
            if train.checkpoint_validation_with_forward_pass:
                self._check_forward_pass(Path(train.load) / self.load_tag)
        # Dropout streams differ per data-parallel rank, after the identical initialisation above. A resumed run
        # has restored them instead; `load` naming a still-empty directory (save == load) is a fresh run.
        if self.load_tag is None or train.finetune:
            torch.manual_seed(dropout_seed(train.seed, self.topo))
        self.owns_metrics = runtime.rank == 0
        # Rank 0's metrics sinks; other ranks have a wandb run only with wandb_init_all_ranks.
        self.sinks: MetricsSinks | None = sinks_for_run(
            cfg.log, runtime.rank, run_name=Path(cfg.train.save or cfg.log.log_dir or ".").name,
            run_config={"config": str(config_path), **flat_run_config(cfg.groups())},
            iteration=self.progress.iteration, wandb_group=shared_wandb_group(cfg.log))
        self.diagnostics = build_diagnostics(cfg.log, self.engine, self.topo,
                                             layout_state.param_names_of(self.train_engine), self.global_batch)
        self.flops_per_token = train_flops_per_token(
            # MoE: the parameters a token uses (k of E experts), as Megatron counts MoE FLOPs.
            matmul_params(self.num_params - inactive_params(cfg.model), cfg.model.padded_vocab_size,
                          cfg.model.hidden_size,
                          tied_head=not cfg.model.no_weight_tying,
                          learned_pos_rows=cfg.model.max_positions if cfg.model.pos_emb == "learned" else 0),
            cfg.model.num_layers, cfg.model.hidden_size, self.seq_length)
        device_name = torch.cuda.get_device_name(runtime.device) if runtime.is_cuda else None
        self.mfu_peak = mfu_peak(cfg.log.peak_flops, cfg.optim.precision, device_name, self._measured_peak)
        self.peak_flops = self.mfu_peak.flops
        if self.sinks is not None:  # at every start: a resumed run may run on other devices
            self.sinks.write_run_info({"iteration": self.progress.iteration, "mfu_peak_flops": self.peak_flops,
                                       "mfu_peak_source": self.mfu_peak.source})
        if runtime.rank == 0:
            print(f"MFU peak {self.peak_flops / 1e12:.4g} TFLOP/s per device: {self.mfu_peak.source}", flush=True)

    # --- set-up pieces -------------------------------------------------------------------------------------

    def _with_epoch_iterations(self, cfg: NeoXConfig) -> NeoXConfig:
        data = cfg.data
        samples = epochs.train_epoch_samples(data.data_path, data.train_data_paths, data.split, self.seq_length)
        iters = epochs.iterations_for_epochs(cfg.train.train_epochs, samples, self.micro_batch, self.dp_size,
                                             self.grad_accum)
        if self.rt.rank == 0:
            print(f"train_epochs {cfg.train.train_epochs}: one epoch of the train split is {samples} samples -> "
                  f"train_iters {iters}", flush=True)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, train_iters=iters))

    def _phase(self, key: str, available: bool, why: str) -> bool:
        """gpt-neox's do_train/do_valid/do_test: set from the data, and a user's false skips the phase."""
        wanted = getattr(self.cfg.train, key)
        if wanted and not available:
            raise TrainError(f"'{key}' is true but {why}")
        return available and wanted is not False

    def _datasets(self):
        cfg, train = self.cfg, self.cfg.train
        num_samples = split_num_samples(train.train_iters, train.eval_interval, train.eval_iters, self.global_batch)
        # A phase switched off (do_train/do_valid/do_test: false) needs no data.
        num_samples = tuple(n if wanted is not False else 0
                            for n, wanted in zip(num_samples, (train.do_train, train.do_valid, train.do_test)))

        def build():
            return datasets_from_config(cfg.data, seq_length=self.seq_length, seed=train.seed,
                                        num_samples=num_samples,
                                        precompute_model_name=cfg.post_training.precompute_model_name)

        # The builders (global rank 0, or with use_shared_fs false local rank 0 of every node, as in gpt-neox) build
        # the index caches first; the others then load them (the cache also locks, this only keeps N ranks from
        # queueing on the lock while one builds). The builders tell the others whether they succeeded: bad data then
        # stops every rank with a message, instead of a peer's broken-barrier traceback.
        if is_index_builder(self.rt.rank, self.rt.local_rank, cfg.data.use_shared_fs):
            try:
                # deepy checked this before launching; a launch by other means (or from a login node) has not.
                check_run_token_ids(cfg.data, self.tokenizer.vocab_size)
                datasets = build()
            except Exception:
                _any_builder_failed(True, self.rt)
                raise
            _any_builder_failed(False, self.rt)
            return datasets
        if _any_builder_failed(False, self.rt):
            raise TrainError("the rank building the dataset index caches (global rank 0, or each node's local rank 0 "
                             "with use_shared_fs false) failed; its error message says what to fix")
        return build()

    def _untouched_rng(self):
        """Run a block without advancing this rank's RNG streams, which only the training steps may draw from:
        a resumed run restores them at the checkpoint and must then see the very draws the uninterrupted run saw,
        so nothing that happens only at start-up (peak probe, new data iterators) may consume them."""
        return torch.random.fork_rng(devices=[self.rt.device] if self.rt.is_cuda else [])

    def _measured_peak(self, dtype: torch.dtype) -> float:
        with self._untouched_rng():
            local = measure_peak_flops(dtype=dtype, device=self.rt.device)
        return float(all_reduce_mean(torch.tensor(local, dtype=torch.float64)))

    def _checkpoint_to_load(self, load_dir: Path) -> str | None:
        load_folder.require_folder(load_dir)
        self.gpt_neox = open_gpt_neox_checkpoint(load_dir, self.cfg.train.iteration)
        if self.gpt_neox is not None:
            # Its weights go into the model before the engine is built, as a consolidated model's do.
            self.repad = vocab_padding.check_checkpoint_model(self.gpt_neox.config.model, self.cfg.model,
                                                              self.tokenizer.vocab_size, ARCHITECTURE_KEYS,
                                                              self.gpt_neox.path)
            return None
        if is_consolidated(load_dir):
            # Weights only (an imported or exported model): they go into the model before the engine is built.
            if not self.cfg.train.finetune:
                raise TrainError(f"{load_dir} is a consolidated model (weights only, no optimizer state): set "
                                 "'finetune: true' to start training from it")
            saved_cfg = load_resolved(load_dir / "config.yml")
            self.repad = vocab_padding.check_checkpoint_model(saved_cfg.model, self.cfg.model,
                                                              self.tokenizer.vocab_size, ARCHITECTURE_KEYS, load_dir)
            return None
        tag = engine_state.resolve_load_tag(load_dir, self.cfg.train.iteration)
        if tag is None:
            if self.cfg.train.finetune:
                raise TrainError(f"finetune is set but {load_dir} holds no complete checkpoint")
            note = load_folder.start_from_scratch(load_dir, self.cfg.train.save)  # or not a checkpoint folder
            if self.rt.rank == 0:
                print(note, flush=True)
            return None
        saved_cfg = load_resolved(load_dir / tag / "config.yml")
        self.repad = vocab_padding.check_checkpoint_model(saved_cfg.model, self.cfg.model, self.tokenizer.vocab_size,
                                                          ARCHITECTURE_KEYS, load_dir / tag)
        return tag

    def _lora_model(self) -> GPTNeoX:
        """The base loaded whole plus fresh adapters; a resumed run's adapters are loaded later, as any checkpoint."""
        gpt_neox_dir = None if self.gpt_neox is None else Path(self.gpt_neox.path)
        self.lora_base = lora_base_dir(self.cfg, self.lora, self.load_tag, gpt_neox_dir)
        if self.cfg.train.finetune:
            self.load_tag = None  # `load` is the base: nothing of it to load into the engine
        model, repad_note = build_lora_model(self.cfg, self.lora, self.lora_base, self.tokenizer.vocab_size,
                                             ARCHITECTURE_KEYS)
        if self.rt.rank == 0:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"LoRA: {trained:,} adapter parameters ({', '.join(self.lora.target_modules)}, r {self.lora.r}) "
                  f"train on the frozen base {self.lora_base} ({sum(p.numel() for p in model.parameters()):,} "
                  "parameters in all)" + (f"; {repad_note}" if repad_note else ""), flush=True)
        return model

    def _load_consolidated(self, model: GPTNeoX, load_dir: Path) -> None:
        if self.gpt_neox is not None:
            return self._load_gpt_neox(model)
        _, weights = read_consolidated(load_dir)
        if self.repad is not None:
            weights = vocab_padding.repad_state(weights, self.repad.padded)
            self._note_repad()
        model.load_state_dict(lm_weights_for_reward_model(weights, model), strict=True)
        if self.rt.rank == 0:
            print(f"loaded consolidated model {load_dir}: weights only (finetune)", flush=True)

    def _load_gpt_neox(self, model: GPTNeoX) -> None:
        weights = self.gpt_neox.weights()
        if self.repad is not None:
            weights = vocab_padding.repad_state(weights, self.repad.padded)
            self._note_repad()
        model.load_state_dict(lm_weights_for_reward_model(weights, model), strict=True)
        if self.rt.rank == 0:
            mode = ("weights only (finetune)" if self.cfg.train.finetune else
                    f"resuming at iteration {self.gpt_neox.iteration} with a fresh optimizer and LR schedule "
                    "(gpt-neox's optimizer state cannot be mapped to neox's)")
            print(f"loaded gpt-neox checkpoint {self.gpt_neox.path}: {mode}", flush=True)

    def _resume_gpt_neox_position(self, iteration: int) -> None:
        """Plain resume of a gpt-neox checkpoint: its step and data position (gpt-neox restarts its loaders at
        iteration x global batch), a fresh schedule counted from there as after no_load_optim."""
        train = self.cfg.train
        evaluations = iteration // train.eval_interval if train.eval_interval else 0
        self.progress = Progress(iteration, iteration * self.global_batch, evaluations)
        self.engine.global_steps = iteration
        self.engine.global_samples = self.progress.consumed_train_samples
        self.schedule_start = iteration

    def _note_repad(self) -> None:
        if self.rt.rank == 0:
            print(self.repad.note(self.topo.tp_size), flush=True)

    def _load(self, load_dir: Path, tag: str) -> None:
        rank_status.enter(f"loading checkpoint {load_dir / tag}")
        train = self.cfg.train
        ckpt_dir = load_dir / tag
        saved_layout = layout_state.layout_of(load_resolved(ckpt_dir / "config.yml"))
        same_layout = saved_layout == layout_state.layout_of(self.cfg)
        # no_save_optim wrote no DeepSpeed files and no optimizer state: its weights are the layout-free copy. An
        # expert-parallel run writes no DeepSpeed files either: its whole state is the layout-free copy.
        engine_files = engine_state.has_engine_state(ckpt_dir)
        optimizer_saved = engine_files or layout_state.has_optimizer_state(ckpt_dir)
        # As gpt-neox: the optimizer and the LR schedule are loaded together, or neither.
        load_optim = optimizer_saved and not train.finetune and not train.no_load_optim
        # no_load_optim takes the exact fp32 weights of the layout-free copy where there is one (DeepSpeed's
        # module-only load of a ZeRO-3 checkpoint would read the files of the tag in `latest`, not of this one).
        # A re-padded vocabulary (self.repad) no longer fits DeepSpeed's files: the layout-free copy is re-padded.
        via_engine_files = same_layout and engine_files and self.repad is None and (
            load_optim or train.finetune or not layout_state.has_layout_free_state(ckpt_dir))
        if via_engine_files:
            state = engine_state.load(self.engine, load_dir, tag, self.rt.rank, finetune=train.finetune,
                                      load_optimizer=load_optim, load_rng=not train.no_load_rng)
        else:
            state = self._load_layout_free(ckpt_dir, saved_layout, weights_only=not load_optim)
        if train.finetune:
            if self.rt.rank == 0:
                print(f"loaded checkpoint {ckpt_dir}: weights only (finetune)", flush=True)
            return
        self.progress = Progress(**{k: state[k] for k in dataclasses.asdict(Progress())})
        iteration = self.progress.iteration
        self.engine.global_steps = iteration
        self.engine.global_samples = self.progress.consumed_train_samples
        self._restore_rng(ckpt_dir, same_layout, from_engine_files=via_engine_files)
        if load_optim:
            self._resume_schedule(state.get(SCHEDULE_STATE_KEY), iteration)
        else:
            self.schedule_start = iteration  # a fresh optimizer gets a fresh schedule (warmup again), as gpt-neox
        if self.rt.rank == 0:
            mode = f"resuming at iteration {iteration}"
            if not load_optim:
                why = "no_load_optim" if optimizer_saved else "the checkpoint was saved with no_save_optim"
                mode += f" with a fresh optimizer and LR schedule ({why})"
            print(f"loaded checkpoint {ckpt_dir}: {mode}", flush=True)

    def _restore_rng(self, ckpt_dir: Path, same_layout: bool, from_engine_files: bool) -> None:
        """Every rank's RNG streams as saved; else (no_load_rng, no_save_rng, another layout, whose ranks are
        others) dropout restarts from a seed of dp rank and step."""
        if same_layout and engine_state.has_rng_state(ckpt_dir):
            if not self.cfg.train.no_load_rng:
                if not from_engine_files:  # engine_state.load restored them already
                    engine_state.set_rng_state(engine_state.read_rng_state(ckpt_dir, self.rt.rank))
                return
            warning = engine_state.missing_rng_warning(ckpt_dir, self.rt.rank)
            if warning:
                print(warning, flush=True)
        torch.manual_seed(dropout_seed(self.cfg.train.seed, self.topo) + 7919 * self.progress.iteration)

    def _resume_schedule(self, saved: dict | None, iteration: int) -> None:
        """gpt-neox's AnnealingLR.load_state_dict: the checkpoint's schedule settings against the config's."""
        if saved is None:
            return  # written before checkpoints kept their schedule: the config's, counted from iteration 0
        optim = self.cfg.optim
        try:
            self.schedule, notes = resume_schedule(self.schedule, saved, override=optim.override_lr_scheduler,
                                                   use_checkpoint=optim.use_checkpoint_lr_scheduler)
        except ScheduleMismatch as err:
            raise TrainError(str(err)) from None
        self.schedule_start = iteration - int(saved.get("num_iters", iteration))
        if self.rt.rank == 0:
            for note in notes:
                print(f"learning-rate schedule: {note}", flush=True)

    def _load_layout_free(self, ckpt_dir: Path, saved_layout: dict, weights_only: bool) -> dict:
        """Resume (or finetune) from the layout-free copy: a checkpoint written at another tp/pp/dp/ZeRO layout,
        or one saved with no_save_optim (its only copy of the weights)."""
        finetune = self.cfg.train.finetune
        resizable = frozenset()
        if self.repad is not None:  # the vocabulary rows past the checkpoint's start at zero
            resizable = frozenset(vocab_padding.VOCAB_ROWS)
            self._note_repad()
        # Each rank reads only the byte ranges its own engine holds (neox/checkpoint/layout_state.py).
        loaded = layout_state.load_layout_free_state(self.engine, layout_state.param_names_of(self.train_engine),
                                                     self.topo, ckpt_dir, weights_only=weights_only or finetune,
                                                     resizable_rows=resizable)
        if self.rt.rank == 0 and saved_layout != layout_state.layout_of(self.cfg):
            print(f"{ckpt_dir} was written at {saved_layout}; loaded its layout-free state at "
                  f"{layout_state.layout_of(self.cfg)} (rank 0 read {loaded.stats.bytes_read} bytes)", flush=True)
        return {} if finetune else loaded.client_state

    def _check_forward_pass(self, ckpt_dir: Path) -> None:
        record = forward_check.read_record(ckpt_dir)
        text = None if record is None else forward_check.input_for(record, self.micro_batch, self.seq_length)
        if text is None:
            if self.rt.rank == 0:
                why = "has no forward pass stored" if record is None else "stored one of another seq_length"
                print(f"WARNING: checkpoint_validation_with_forward_pass is set but {ckpt_dir} {why}; not checked",
                      flush=True)
            return
        warning = forward_check.compare(ckpt_dir, record["loss"],
                                        forward_check.forward_loss(self.train_engine, text, self.grad_accum))
        if self.rt.rank == 0:
            print(warning or f"checkpoint_validation_with_forward_pass: {ckpt_dir} gives the saved loss "
                  f"{record['loss']!r} again", flush=True)

    def _loader(self, dataset, consumed: int):
        # torch's DataLoader draws a worker base seed from the global torch RNG each time an iterator is made; a
        # resumed run makes its train iterator at the checkpoint's step, the uninterrupted run does not.
        with self._untouched_rng():
            return build_loader(dataset, consumed_samples=consumed, micro_batch_size=self.micro_batch,
                                global_batch_size=self.global_batch, dp_rank=self.dp_rank,
                                dp_size=self.dp_size, eod_token=self.tokenizer.eod,
                                eod_mask_loss=self.cfg.data.eod_mask_loss, num_workers=self.cfg.data.num_workers)

    # --- the loop ------------------------------------------------------------------------------------------

    def train_step(self, data_iter) -> tuple[float, float | None]:
        if self.curriculum is not None:
            data_iter = self.curriculum.step_batches(data_iter, self.progress.iteration, self.engine)
        rank_loss, grad_norm = self.train_engine.step(data_iter, self.grad_accum,
                                                      self.schedule.lr_at(self.progress.iteration - self.schedule_start))
        mean_loss = all_reduce_mean(rank_loss)
        self._window_metrics.append(self.train_engine.last_metrics)
        self.progress.iteration += 1
        self.progress.consumed_train_samples += self.global_batch
        return float(mean_loss), (None if grad_norm is None else float(grad_norm))

    @torch.no_grad()
    def evaluate(self, data_iter: Iterator, iters: int) -> float:
        rank_status.enter(f"evaluation at step {self.progress.iteration}")
        self.engine.eval()
        if self.curriculum is not None:
            self.curriculum.full_length(self.engine)  # gpt-neox evaluates full-length batches
        loss = self.train_engine.eval_loss(data_iter, iters, self.grad_accum)  # each global batch's token mean
        self.engine.train()
        return float(all_reduce_mean(loss.float()))

    def _valid_batches(self, consumed: int) -> Iterator:
        """The validation reader, made at this process's first evaluation's cursor (consumed): each evaluation reads
        exactly eval_iters global batches, so it stays at eval_consumed_samples of the next one."""
        if self._valid_reader is None:
            self._valid_reader = self._loader(self.valid_ds, consumed)
        return self._valid_reader

    def validate(self) -> dict:
        train = self.cfg.train
        consumed = eval_consumed_samples(self.progress.evaluations_done, train.eval_iters, self.global_batch)
        loss = self.evaluate(self._valid_batches(consumed), train.eval_iters)
        self.progress.evaluations_done += 1
        record = {"iteration": self.progress.iteration, "valid_loss": loss, "valid_ppl": _ppl(loss)}
        if self.cfg.data.char_level_ppl:
            record["valid_char_level_ppl"] = self._char_level_ppl(self.valid_ds, consumed, train.eval_iters, loss)
        return record

    def _char_level_ppl(self, dataset, consumed: int, iters: int, loss: float) -> float:
        """gpt-neox's char_level_ppl over the samples the evaluation just read, counted on every rank."""
        sampler = MicroBatchSampler(len(dataset), consumed, self.micro_batch, self.global_batch, self.dp_rank,
                                    self.dp_size)
        counts = eval_text_counts(dataset, itertools.islice(sampler, iters * self.grad_accum), self.tokenizer.decode)
        totals = torch.tensor(counts, dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)  # every rank of a replica counts the same text: the ratio holds
        return char_level_ppl(loss, int(totals[0]), int(totals[1]))

    def save(self) -> None:
        rank_status.enter(f"checkpoint save at step {self.progress.iteration}")
        train = self.cfg.train
        run_files = engine_state.RunFiles(self.config_path, tuple(self.tokenizer.files()))
        # Besides DeepSpeed's layout-bound files, a layout-free copy lets any (tp, pp, dp, ZeRO) layout resume.
        client_state = {**self.progress.client_state(),
                        SCHEDULE_STATE_KEY: self.schedule.state(self.progress.iteration - self.schedule_start)}
        if self.rt.rank == 0:
            print(f"saving checkpoint {engine_state.tag_for(self.progress.iteration)}", flush=True)
        forward = None
        if train.checkpoint_validation_with_forward_pass:
            text = forward_check.reference_text(self.micro_batch, self.seq_length, self.tokenizer.vocab_size)
            forward = (text, forward_check.forward_loss(self.train_engine, text, self.grad_accum))

        # DeepSpeed's files cannot hold expert-parallel shards under our names (its engine keeps only dp rank 0's
        # module and its own MoE files expect its own MoE layers): such a run's state is the layout-free copy alone.
        expert_parallel = self.topo.ep_size > 1

        def write_extra(ckpt_dir: Path, submit) -> None:
            # Without it (checkpoint_layout_free: false) tools/reshard_checkpoint.py rebuilds it offline when
            # needed; with no_save_optim it is the checkpoint's only copy of the weights. Each rank writes its own
            # shard (submit: to the background writer of checkpoint_async).
            if train.checkpoint_layout_free or train.no_save_optim or expert_parallel:
                layout_state.save_layout_free_state(ckpt_dir, self.engine,
                                                    layout_state.param_names_of(self.train_engine), self.topo,
                                                    client_state, with_moments=not train.no_save_optim,
                                                    submit=submit)
            if forward is not None and self.rt.rank == 0:
                forward_check.save_record(ckpt_dir, *forward, self.progress.iteration)
            if self.lora_base is not None and self.rt.rank == 0:
                write_base_record(ckpt_dir, self.lora_base)  # the checkpoint holds the adapters only

        stall = self.saver.save(self.engine, Path(train.save), self.progress.iteration, client_state, run_files,
                                train.keep_last_n_checkpoints, write_extra,
                                engine_state=not train.no_save_optim and not expert_parallel,
                                save_rng=not train.no_save_rng, config_files=train.config_files)
        self._last_saved = self.progress.iteration
        if self.rt.rank == 0 and train.checkpoint_async:
            print(f"checkpoint {engine_state.tag_for(self.progress.iteration)}: training resumes after {stall:.3f} s; "
                  "its files are written in the background", flush=True)

    def _checkpoint_complete(self, path: Path, seconds: float) -> None:
        if self.rt.rank == 0:
            print(f"saved checkpoint {path}", flush=True)
            if self.cfg.train.checkpoint_async:
                print(f"checkpoint {path.name} durable {seconds:.3f} s after its save began", flush=True)
        if self.s3 is not None:
            self.s3.submit(path)

    def run(self, stop: StopRequests | None = None) -> bool:
        """gpt-neox's order: the step-0 checkpoint (0 in extra_save_iters), training (do_train) with its
        checkpoints and evaluations, a last validation (do_valid), the final checkpoint, the test split (do_test).
        True if a preemption request stopped it early (after a checkpoint); exit_interval stops it with False."""
        train = self.cfg.train
        start = self.progress.iteration
        self._last_saved = start  # a checkpoint of the current iteration exists (or it is where we started)
        self._valid_at = None  # iteration of the last validation in this run
        # Not when this very checkpoint was just resumed (save == load): it would only be written again.
        resumed_here = (self.load_tag is not None and not train.finetune and train.load is not None
                        and Path(train.load).resolve() == Path(train.save or "").resolve())
        if train.save and start == 0 and self.save_schedule.due(0) and not resumed_here:
            self.save()
        if not self.do_train:
            if self.rt.rank == 0:
                print(f"do_train is false: no training steps (at iteration {start})", flush=True)
        elif start >= train.train_iters:
            if self.rt.rank == 0:
                print(f"nothing to train: checkpoint is at iteration {start} >= train_iters", flush=True)
        else:
            outcome = self._train_loop(stop)
            if outcome != "done":
                self.saver.wait()
                return outcome == "preempted"
        it = self.progress.iteration
        if self.do_valid and self._valid_at != it:  # the loop may just have validated at this iteration
            self._log(self.validate())
        if train.save and self._last_saved != it:
            self.save()
        self.saver.wait()
        if self.do_test:
            loss = self.evaluate(self._loader(self.test_ds, 0), train.eval_iters)
            record = {"iteration": it, "test_loss": loss, "test_ppl": _ppl(loss)}
            if self.cfg.data.char_level_ppl:
                record["test_char_level_ppl"] = self._char_level_ppl(self.test_ds, 0, train.eval_iters, loss)
            self._log(record)
        return False

    def _train_loop(self, stop: StopRequests | None) -> str:
        """Steps to train_iters: "done", "preempted" (stopped after a checkpoint) or "exited" (exit_interval)."""
        cfg, train, log = self.cfg, self.cfg.train, self.cfg.log
        self.engine.train()
        data_iter = self._loader(self.train_ds, self.progress.consumed_train_samples)
        start = time.perf_counter()
        # Throughput over the window's own steps: each step is timed, so evaluations and checkpoints between them
        # (and the logging) never count, whatever the intervals.
        window_seconds, window_losses = 0.0, []
        while self.progress.iteration < train.train_iters:
            rank_status.enter(f"training step {self.progress.iteration + 1}")
            step_start = time.perf_counter()
            with self.profiler.step(self.progress.iteration):
                loss, grad_norm = self.train_step(data_iter)
            if self.diagnostics is not None:
                record = self.diagnostics.after_step(self.progress.iteration)  # collective; rank 0 gets it
                if record:
                    self._log(record)
            window_seconds += time.perf_counter() - step_start
            window_losses.append(loss)
            self.saver.poll()  # completes a background checkpoint once every rank has written it
            it = self.progress.iteration
            if it % log.log_interval == 0 or it == train.train_iters:
                self._log(self._train_record(window_losses, grad_norm, window_seconds / len(window_losses),
                                             time.perf_counter() - start))
                window_seconds, window_losses = 0.0, []
            if self.do_valid and it % train.eval_interval == 0:
                self._log(self.validate())
                self._valid_at = it
            # After the evaluation (gpt-neox saves before it): the checkpoint's validation cursor then counts it, so
            # a resumed run reads the very validation batches an uninterrupted one reads.
            if train.save and self.save_schedule.due(it):
                self.save()
            if self.fault is not None:
                self.fault.after_step(self.rt.rank, it)
            if train.exit_interval and it % train.exit_interval == 0:
                if self.rt.rank == 0:
                    print(f"exit_interval {train.exit_interval}: exiting after iteration {it}", flush=True)
                return "exited"
            # Every rank takes part, every step (one all-reduce of a flag): they all stop after the same step.
            if stop is not None and it < train.train_iters and stop.agreed():
                self._stop_for_preemption(self._last_saved)
                return "preempted"
        return "done"

    def _stop_for_preemption(self, last_saved: int) -> bool:
        it = self.progress.iteration
        if self.cfg.train.save and last_saved != it:
            self.save()
        self.saver.wait()  # a background write (checkpoint_async) finishes before the run stops
        if self.rt.rank == 0:
            where = f"checkpoint {engine_state.tag_for(it)} is written" if self.cfg.train.save else \
                "no checkpoint: 'save' is not set, a relaunch starts over"
            print(f"preempted: stopped after iteration {it} of {self.cfg.train.train_iters}; {where}; exit code "
                  f"{self.cfg.train.preempt_exit_code} asks for a requeue (relaunch with load = save to resume)",
                  flush=True)
        return True

    def _train_record(self, losses: list[float], grad_norm: float | None, step_time: float, elapsed: float) -> dict:
        # A curriculum feeds shorter sequences: count the tokens the logged steps really read.
        seq_length = self.seq_length if self.curriculum is None else self.curriculum.take_window_mean()
        tokens_per_sec = self.global_batch * seq_length / step_time
        flops_per_rank = self.flops_per_token * tokens_per_sec / self.rt.world_size
        record = {
            "iteration": self.progress.iteration,
            "lm_loss": sum(losses) / len(losses),
            **window_means(self._window_metrics),  # the objective's metrics (rewards_chosen, ...), if any
            # preference objectives: their loss also under TRL's name, for a side-by-side reading
            **({"loss": sum(losses) / len(losses)} if self.objective.name != "normal" else {}),
            "lr": self.schedule.lr_at(self.progress.iteration - 1 - self.schedule_start),
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
        self._window_metrics = []
        if self.curriculum is not None:
            record["curriculum_seqlen"] = self.curriculum.length  # gpt-neox logs it under this name
        if self.moe_metrics is not None:
            record.update(self.moe_metrics.collect())  # collective: every rank builds this record
        return record

    def _log(self, record: dict) -> None:
        if self.sinks is not None:
            self.sinks.write(record)

    def close(self) -> None:
        self.profiler.close()  # a run that ended inside the profiled window
        if self.sinks is not None:
            self.sinks.close()
        if self.s3 is not None:
            self.s3.finish()  # last: raises S3UploadError if a checkpoint did not reach S3


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _train(cfg: NeoXConfig, config_path: Path, runtime: Runtime) -> int:
    run_dir = config_path.parent  # where deepy wrote the resolved config: {save or log_dir}
    stop = StopRequests(stop_request_path(run_dir) if runtime.local_rank == 0 else None, runtime.device)
    stop.install()
    if cfg.mup.save_base_shapes:  # muP's first run (gpt-neox: save, then exit): the file, no training
        mup_modes.save_base_shapes(cfg, runtime.rank)
        return 0
    trainer = Trainer(cfg, config_path, runtime)
    try:
        if cfg.mup.coord_check:  # muP's check on the training data (gpt-neox: plots, then exit), no training
            if trainer.train_ds is None:
                raise TrainError("coord_check trains on a batch of the train split, which is empty: give "
                                 "'split' a train share or set 'train_data_paths'")
            mup_modes.run_coord_check(cfg, next(trainer._loader(trainer.train_ds, 0)),
                                      Path(cfg.log.log_dir or run_dir), runtime.rank, runtime.device)
            preempted = False
        else:
            preempted = trainer.run(stop)
    finally:
        trainer.close()
    return cfg.train.preempt_exit_code if preempted else 0


def _in_rank_log(cfg: NeoXConfig, config_path: Path, rank: int, rest: Callable[[], int | None]) -> int | None:
    """The rank's log, status and exit record ({save or log_dir}/ranks) around its whole life from before the
    rendezvous: a rank that never joins, or hangs or fails in the rendezvous, is named in deepy's report too."""
    with RankLog(rank_log.ranks_dir(cfg.log.log_dir, config_path.parent), rank) as log:
        faults.hang_before_rendezvous(rank)  # only in a failure test that asks for it
        log.exit_code = rest()
    return log.exit_code


PROGRAM = RankProgram(module="neox.train", launch_command="deepy train", description=__doc__.splitlines()[0],
                      body=_train, input_errors=_INPUT_ERRORS, around_rank=_in_rank_log)


def main(argv: list[str] | None = None) -> int:
    return run_rank_program(PROGRAM, argv)


if __name__ == "__main__":
    sys.exit(main())
