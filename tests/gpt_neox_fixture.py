"""Checkpoints in EleutherAI gpt-neox's layout, written from a tiny Hugging Face model's weights: the fixture of
neox/checkpoint/gpt_neox.py. Built from the documented layout, not by running gpt-neox:
- names and tp splits as gpt-neox's tools/ckpts/convert_neox_to_hf.py reads them (HF's GPTNeoX query_key_value
  and MLP weights are gpt-neox's; Llama's q/k/v and gate/up are split out of gpt-neox's query_key_value and linear1),
- layer numbering of megatron/model/gpt2_model.py (0 embedding, 2.. transformer layers, L+3 norm, L+4 head),
- DeepSpeed's file names (PipelineModule.ckpt_layer_path: layer_XX-model_YY-model_states.pt; engine._get_ckpt_name:
  mp_rank_YY_model_states.pt holding `module` and the client state of megatron/checkpointing.py),
- the row-parallel biases of megatron/mpu/layers.py: a whole copy on every rank, summed by the all-reduce of a
  gpt_j_residual layer (so each rank stores bias / tp), added once after it otherwise (each rank stores the bias).
The YAML files in configs/ use gpt-neox's own spelling (dashes, attention-config, its fp16 / bf16 sections).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

# A model gpt-neox and transformers both express; `hf` is the transformers class, `config` its gpt-neox YAML.
VOCAB = 512  # CharLevelTokenizer
DIVISIBLE_BY = 80  # so the padded vocabulary differs with tp: 560 at tp1, 640 at tp2


def padded_vocab(tp: int) -> int:
    multiple = DIVISIBLE_BY * tp
    return -(-VOCAB // multiple) * multiple


@dataclass(frozen=True)
class Arch:
    name: str
    hf: str  # "gpt_neox" | "llama"
    gpt_j_residual: bool
    tied: bool
    storage: torch.dtype  # dtype of the stored module weights (gpt-neox saves them in its training precision)
    gpt_neox_keys: dict


_COMMON = {
    "num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 64, "max-position-embeddings": 64,
    "pos-emb": "rotary", "output-layer-parallelism": "column", "attention-config": [[["flash"], 2]],
    "make-vocab-size-divisible-by": DIVISIBLE_BY, "tokenizer-type": "CharLevelTokenizer",
    "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "min_lr": 0.00006, "zero_optimization": {"stage": 1, "allgather_partitions": True, "reduce_scatter": True,
                                             "overlap_comm": True, "contiguous_gradients": True},
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train-iters": 1000,
    "lr-decay-style": "cosine", "warmup": 0.01, "checkpoint-activations": True, "checkpoint-num-layers": 1,
    "partition-activations": True, "synchronize-each-layer": True, "gradient_clipping": 1.0, "weight-decay": 0.1,
    "hidden-dropout": 0, "attention-dropout": 0, "checkpoint-factor": 500, "eval-interval": 1000, "eval-iters": 10,
    "log-interval": 10, "steps_per_print": 10, "wall_clock_breakdown": True,
}
LOCAL_SETUP = {"data-path": "data/enwik8/enwik8_text_document", "save": "checkpoints", "load": "checkpoints",
               "tensorboard-dir": "tensorboard", "log-dir": "logs"}

PYTHIA = Arch("pythia", "gpt_neox", gpt_j_residual=True, tied=False, storage=torch.float16, gpt_neox_keys={
    **_COMMON, "rotary-pct": 0.25, "no-weight-tying": True, "gpt-j-residual": True, "norm": "layernorm",
    "activation": "gelu", "bias-gelu-fusion": False, "scaled-upper-triang-masked-softmax-fusion": True,
    "init_method": "small_init", "output_layer_init_method": "wang_init",
    "fp16": {"fp16": True, "enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 12,
             "hysteresis": 2, "min_loss_scale": 1}})
# Llama as gpt-neox trains it: RMSNorm, SwiGLU, no biases, untied head; here with grouped-query attention.
LLAMA_GQA = Arch("llama_gqa", "llama", gpt_j_residual=False, tied=False, storage=torch.bfloat16, gpt_neox_keys={
    **_COMMON, "num-kv-heads": 2, "rotary-pct": 1, "no-weight-tying": True, "gpt-j-residual": False,
    "norm": "rmsnorm", "rms-norm-epsilon": 1.0e-6, "activation": "swiglu", "intermediate-size": 192,
    "use_bias_in_norms": False, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
    "bf16": {"enabled": True}})
# Sequential residual (biases added after the all-reduce) with the head tied to the embedding: no layer L+4.
NEOX_TIED = Arch("neox_tied", "gpt_neox", gpt_j_residual=False, tied=True, storage=torch.float32, gpt_neox_keys={
    **_COMMON, "rotary-pct": 0.5, "no-weight-tying": False, "gpt-j-residual": False, "norm": "layernorm",
    "activation": "gelu"})
ARCHES = {a.name: a for a in (PYTHIA, LLAMA_GQA, NEOX_TIED)}


# ------------------------------------------------------------------------------------------ the source model

def source_model(arch: Arch, tp: int, seed: int = 0):
    """A transformers model of `arch` with gpt-neox's padded vocabulary at tp, every parameter random (biases and
    norms too) and exactly representable in the checkpoint's storage dtype."""
    import transformers

    vocab = padded_vocab(tp)
    if arch.hf == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            hidden_act="gelu", max_position_embeddings=64, layer_norm_eps=1e-5,
            use_parallel_residual=arch.gpt_j_residual, tie_word_embeddings=arch.tied, attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": arch.gpt_neox_keys["rotary-pct"]})
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=64, hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6,
            attention_bias=False, mlp_bias=False, tie_word_embeddings=arch.tied,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif param.dim() == 1:
                value = 0.1 * noise
            elif "embed" in name:
                value = 0.5 * noise
            else:
                value = noise / param.shape[1] ** 0.5
            param.copy_(value.to(arch.storage).to(torch.float32))
    return model.eval()


# ------------------------------------------------------------------------------------------ gpt-neox's shards

def _chunks(t: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    return [c.clone() for c in torch.chunk(t, tp, dim=dim)]


def _row_bias(b: torch.Tensor, arch: Arch, tp: int) -> list[torch.Tensor]:
    return [b / tp if arch.gpt_j_residual else b.clone() for _ in range(tp)]


def gpt_neox_layers(arch: Arch, model, tp: int) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per tp rank: gpt-neox layer index -> that layer's state dict, as gpt-neox holds them."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ranks: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(tp)]
    n = model.config.num_hidden_layers

    def put(index: int, name: str, shards: list[torch.Tensor]) -> None:
        for rank, shard in enumerate(shards):
            ranks[rank].setdefault(index, {})[name] = shard

    if arch.hf == "gpt_neox":
        put(0, "word_embeddings.weight", _chunks(sd["gpt_neox.embed_in.weight"], tp, 0))
        rotary = int(16 * arch.gpt_neox_keys["rotary-pct"])
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)
        for i in range(n):
            p, idx = f"gpt_neox.layers.{i}.", i + 2
            for norm in ("input_layernorm", "post_attention_layernorm"):
                for kind in ("weight", "bias"):
                    put(idx, f"{norm}.{kind}", [sd[f"{p}{norm}.{kind}"].clone() for _ in range(tp)])
            for kind in ("weight", "bias"):
                put(idx, f"attention.query_key_value.{kind}",
                    _chunks(sd[f"{p}attention.query_key_value.{kind}"], tp, 0))
                put(idx, f"mlp.linear1.{kind}", _chunks(sd[f"{p}mlp.dense_h_to_4h.{kind}"], tp, 0))
            put(idx, "attention.dense.weight", _chunks(sd[f"{p}attention.dense.weight"], tp, 1))
            put(idx, "attention.dense.bias", _row_bias(sd[f"{p}attention.dense.bias"], arch, tp))
            put(idx, "mlp.linear2.weight", _chunks(sd[f"{p}mlp.dense_4h_to_h.weight"], tp, 1))
            put(idx, "mlp.linear2.bias", _row_bias(sd[f"{p}mlp.dense_4h_to_h.bias"], arch, tp))
            if arch is PYTHIA:  # older gpt-neox (Pythia's) saved the rotary buffer with each layer
                put(idx, "attention.rotary_emb.inv_freq", [inv_freq.clone() for _ in range(tp)])
        for kind in ("weight", "bias"):
            put(n + 3, f"norm.{kind}", [sd[f"gpt_neox.final_layer_norm.{kind}"].clone() for _ in range(tp)])
        if not arch.tied:
            put(n + 4, "final_linear.weight", _chunks(sd["lm_head.weight"], tp, 0))
        return ranks

    put(0, "word_embeddings.weight", _chunks(sd["model.embed_tokens.weight"], tp, 0))
    for i in range(n):
        p, idx = f"model.layers.{i}.", i + 2
        put(idx, "input_layernorm.scale", [sd[f"{p}input_layernorm.weight"].clone() for _ in range(tp)])
        put(idx, "post_attention_layernorm.scale", [sd[f"{p}post_attention_layernorm.weight"].clone()
                                                    for _ in range(tp)])
        # gpt-neox's grouped-query layout: each rank stacks [its q heads | its k heads | its v heads].
        q, k, v = (_chunks(sd[f"{p}self_attn.{x}_proj.weight"], tp, 0) for x in "qkv")
        put(idx, "attention.query_key_value.weight", [torch.cat(t) for t in zip(q, k, v)])
        put(idx, "attention.dense.weight", _chunks(sd[f"{p}self_attn.o_proj.weight"], tp, 1))
        # linear1 on each rank is [up | gate] (gpt-neox's Gated_Activation: x, gate = chunk(2); act(gate) * x).
        up, gate = (_chunks(sd[f"{p}mlp.{x}_proj.weight"], tp, 0) for x in ("up", "gate"))
        put(idx, "mlp.linear1.weight", [torch.cat(t) for t in zip(up, gate)])
        put(idx, "mlp.linear2.weight", _chunks(sd[f"{p}mlp.down_proj.weight"], tp, 1))
    put(n + 3, "norm.scale", [sd["model.norm.weight"].clone() for _ in range(tp)])
    if not arch.tied:
        put(n + 4, "final_linear.weight", _chunks(sd["lm_head.weight"], tp, 0))
    return ranks


# ------------------------------------------------------------------------------------------ the files

def _deepspeed_record(module, tp: int, iteration: int, arch: Arch) -> dict:
    """mp_rank_YY_model_states.pt: DeepSpeed's engine record with gpt-neox's client state merged in."""
    return {
        "module": module, "buffer_names": [], "optimizer": None, "param_shapes": None, "frozen_param_shapes": None,
        "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": {"num_iters": iteration, "max_lr": 6e-4},
        "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
        "global_steps": iteration, "global_samples": iteration * 4, "dp_world_size": 1, "mp_world_size": tp,
        "ds_config": {"train_micro_batch_size_per_gpu": 4}, "ds_version": "0.12.4",
        # megatron/checkpointing.py save_ds_checkpoint
        "iteration": iteration,
        "args": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64,
                 "make_vocab_size_divisible_by": DIVISIBLE_BY, "padded_vocab_size": padded_vocab(tp),
                 "tokenizer_type": "CharLevelTokenizer", "model_parallel_size": tp},
        "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
    }


def write_checkpoint(save_dir: Path, arch: Arch, model, tp: int, layout: str, iteration: int = 100) -> Path:
    """{save_dir}/global_step{iteration}/ in gpt-neox's `layout` ("pipeline" or "sequential") and {save_dir}/latest."""
    ckpt = Path(save_dir) / f"global_step{iteration}"
    (ckpt / "configs").mkdir(parents=True)
    for rank, layers in enumerate(gpt_neox_layers(arch, model, tp)):
        layers = {i: {k: v.to(arch.storage) if v.is_floating_point() and not k.endswith("inv_freq") else v
                      for k, v in state.items()} for i, state in layers.items()}
        if layout == "pipeline":
            for index, state in layers.items():
                torch.save(state, ckpt / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
            module = None
        else:
            module = {f"sequential.{index}.{k}": v for index, state in sorted(layers.items())
                      for k, v in state.items()}
        torch.save(_deepspeed_record(module, tp, iteration, arch), ckpt / f"mp_rank_{rank:02d}_model_states.pt")
    keys = {**arch.gpt_neox_keys, "model-parallel-size": tp, "pipe-parallel-size": 1 if layout == "pipeline" else 0}
    (ckpt / "configs" / f"{arch.name}.yml").write_text(
        f"# gpt-neox config of a tiny {arch.name} model\n" + yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    (ckpt / "configs" / "local_setup.yml").write_text(yaml.safe_dump(LOCAL_SETUP, sort_keys=False), encoding="utf-8")
    (Path(save_dir) / "latest").write_text(ckpt.name, encoding="utf-8")
    return ckpt
