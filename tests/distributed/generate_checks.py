"""Per-rank functions for tests/distributed/test_generate_ranks.py (module level: spawned ranks import them)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from neox.config.model import ModelConfig
from neox.generate.decode import DecodeRequest, TokenSync, decode
from neox.generate.parallel_model import ParallelDecoder
from neox.generate.sampling import SamplingParams
from neox.model import GPTNeoX
from neox.parallel.topology import build_topology

VOCAB = 90  # the tokenizer's; the embedding is padded to 96 (divisible by tp 2)
PROMPTS = [[5, 17, 33], [8, 1, 2, 60, 61, 62, 7], [44]]
PARTITION = "type:transformer|mlp"  # gpt-neox's default pipe_partition_method


def model(**changes) -> GPTNeoX:
    torch.manual_seed(0)
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=64, pos_emb="rotary",
                rotary_pct=0.5, padded_vocab_size=96, init_method_std=0.3, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoX(ModelConfig(**{**base, **changes})).eval()


def _tokens(results) -> list[list[int]]:
    return [c.tokens for c in results]


def sampled_with_and_without_sync() -> dict:
    """Each rank samples with its own seeds: without TokenSync the ranks diverge, with it all take rank 0's."""
    rank = dist.get_rank()
    request = DecodeRequest(max_new_tokens=12, sampling=SamplingParams(temperature=1.0), vocab_size=VOCAB)
    seeds = [100 * rank + i for i in range(len(PROMPTS))]
    net = model()
    return {
        "alone": _tokens(decode(net, PROMPTS, request, seeds=seeds)),
        "synced": _tokens(decode(net, PROMPTS, request, seeds=seeds, sync=TokenSync(0))),
        "rank0_alone": _tokens(decode(net, PROMPTS, request, seeds=list(range(len(PROMPTS))))),
    }


def parallel_layout(tp: int, pp: int, changes: dict) -> dict:
    """Greedy and seeded sampling through ParallelDecoder at tp x pp, next to the single-device result."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's topology grid asks its own comm for ranks
    full = model(**changes)
    greedy = DecodeRequest(max_new_tokens=16, vocab_size=VOCAB, return_logits=True)
    sampled = DecodeRequest(max_new_tokens=16, sampling=SamplingParams(0.8, top_k=30), vocab_size=VOCAB)
    seeds = [11, 12, 13]
    reference = {"greedy": decode(full, PROMPTS, greedy), "sampled": decode(full, PROMPTS, sampled, seeds=seeds)}
    decoder = ParallelDecoder(model(**changes), build_topology(tp, pp), partition_method=PARTITION)
    sync = TokenSync(decoder.sampling_rank, decoder.replica_group)
    out = {}
    for use_cache in (True, False):
        g = decode(decoder, PROMPTS, DecodeRequest(16, vocab_size=VOCAB, use_cache=use_cache, return_logits=True),
                   sync=sync)
        s = decode(decoder, PROMPTS, DecodeRequest(16, SamplingParams(0.8, top_k=30), VOCAB, use_cache=use_cache),
                   seeds=seeds, sync=sync)
        out[use_cache] = {"greedy": _tokens(g), "sampled": _tokens(s), "logits": [c.logits for c in g]}
    return {"reference": {k: _tokens(v) for k, v in reference.items()},
            "reference_logits": [c.logits for c in reference["greedy"]],
            "out": out, "layers": list(decoder.layers), "sampling_rank": decoder.sampling_rank}


def replicas_share_the_prompts(tp: int) -> dict:
    """SampleMaker over dp replicas (x tp): each replica decodes its share of the batches, all get every sample."""
    import deepspeed

    from neox.config.generate import GenerateConfig
    from neox.generate.run import SampleMaker
    from neox.tokenizer import build_tokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = build_tokenizer("CharLevelTokenizer", None, None)
    prompts = ["In the beginning", "And", "Blessed are the", "x", "Then said he unto them"]
    settings = GenerateConfig(maximum_tokens=8, temperature=0.9, top_k=40, generate_batch_size=2)
    changes = dict(padded_vocab_size=512)
    single = SampleMaker(model(**changes), tokenizer, settings, seed=3, max_positions=64, device=torch.device("cpu"))
    reference = single.make(prompts, single.encode(prompts), 0)
    decoder = ParallelDecoder(model(**changes), build_topology(tp, 0), partition_method=PARTITION)
    prefills = []  # batch sizes of the prompts' first forward (the only one with more than one position)
    replica = decoder.replica if tp > 1 else dist.get_rank()
    sharded = SampleMaker(decoder, tokenizer, settings, seed=3, max_positions=64, device=torch.device("cpu"),
                          sync=TokenSync(decoder.sampling_rank, decoder.replica_group) if tp > 1 else None,
                          replica=replica,
                          replicas=decoder.replicas if tp > 1 else dist.get_world_size())
    original_forward = decoder.forward

    def counting_forward(tokens, *args, **kwargs):
        if tokens.shape[1] > 1:
            prefills.append(tokens.shape[0])
        return original_forward(tokens, *args, **kwargs)

    decoder.forward = counting_forward
    samples = sharded.make(prompts, sharded.encode(prompts), 0)
    return {"reference": [s.tokens for s in reference], "samples": [s.tokens for s in samples],
            "texts": [s.text for s in samples], "prompts": [s.prompt for s in samples],
            "prefill_batches": prefills, "replica": replica}
