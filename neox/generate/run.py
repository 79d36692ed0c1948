"""The per-rank generation program: `python -m neox.generate --config RESOLVED.yml` (started by `deepy generate`).

resolved config -> runtime -> the checkpoint at `load` (model + its tokenizer) -> prompts of the chosen mode ->
batched decoding (data-parallel replicas share out the batches; the ranks of one tp x pp replica feed the tokens
its last stage sampled) -> rank 0 writes sample_output_file.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from neox.config.errors import ConfigError
from neox.config.generate import GenerateConfig
from neox.config.neox_config import NeoXConfig
from neox.entrypoint import RankProgram, run_rank_program
from neox.generate.decode import DecodeRequest, GenerationError, StopStrings, TokenSync, timed_decode
from neox.generate.samples_io import Sample, read_prompts, write_samples
from neox.generate.sampling import SamplingError, SamplingParams
from neox.model import GPTNeoX
from neox.parallel.runtime import Runtime
from neox.tokenizer import Tokenizer, TokenizerError

INTERACTIVE_PROMPT = "Context prompt >>> "
# Seeds of consecutive samples are spread apart so that (seed, index) pairs of nearby seeds do not collide.
SEED_STRIDE = 1 << 20


class GenerateError(RuntimeError):
    """The launch cannot generate as configured (missing checkpoint, wrong layout...)."""


@dataclass
class SampleMaker:
    """Text in, Samples out: encodes prompts, decodes them in batches, decodes the continuations."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    settings: GenerateConfig
    seed: int
    max_positions: int
    device: torch.device
    sync: TokenSync | None = None
    replica: int = 0  # this rank's data-parallel replica: it decodes batches replica, replica + replicas, ...
    replicas: int = 1

    def request(self) -> DecodeRequest:
        s = self.settings
        return DecodeRequest(
            max_new_tokens=s.maximum_tokens,
            sampling=SamplingParams(s.temperature, s.top_k, s.top_p),
            vocab_size=self.tokenizer.vocab_size,
            eod=self.tokenizer.eod,
            pad=self.tokenizer.pad if self.tokenizer.pad is not None else self.tokenizer.eod,
            use_cache=not s.recompute,
            max_positions=self.max_positions,
            return_logits=s.return_logits,
        )

    def sample_seed(self, index: int) -> int:
        return (self.seed * SEED_STRIDE + index) % (1 << 63)

    def make(self, prompts: list[str], token_prompts: list[list[int]], first_index: int) -> list[Sample]:
        """Samples for prompts[i] (encoded as token_prompts[i]), in that order; sample i is seeded by
        first_index + i. Batches group prompts of similar length (less padding); seeds follow the prompt."""
        stop = StopStrings(self.settings.stop_strings, self.tokenizer.decode) if self.settings.stop_strings else None
        request = self.request()
        mine: dict[int, Sample] = {}
        by_length = sorted(range(len(token_prompts)), key=lambda i: len(token_prompts[i]))
        size = self.settings.generate_batch_size
        for batch_index, start in enumerate(range(0, len(by_length), size)):
            if batch_index % self.replicas != self.replica:
                continue
            rows = by_length[start : start + size]
            continuations, seconds = timed_decode(
                self.model, [token_prompts[i] for i in rows], request,
                seeds=[self.sample_seed(first_index + i) for i in rows], stop=stop, sync=self.sync,
                device=self.device)
            for i, cont in zip(rows, continuations):
                text = cont.text if cont.text is not None else self.tokenizer.decode(cont.tokens)
                mine[i] = Sample(prompt=prompts[i], text=text, tokens_generated=len(cont.tokens),
                                 finish_reason=cont.finish_reason, seconds=seconds, tokens=cont.tokens,
                                 logits=cont.logits)
        everything = _merge_from_all_ranks(mine) if self.replicas > 1 else mine
        return [everything[i] for i in range(len(token_prompts))]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        encoded = []
        for number, prompt in enumerate(prompts, start=1):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise GenerationError(f"prompt {number} ({prompt!r}) encodes to no tokens")
            if len(ids) >= self.max_positions:
                raise GenerationError(f"prompt {number} has {len(ids)} tokens but the model has "
                                      f"{self.max_positions} positions; shorten it to leave room to generate")
            encoded.append(ids)
        return encoded


def unconditional(maker: SampleMaker) -> list[Sample]:
    """num_samples continuations of the bare EOD token (gpt-neox's unconditional mode)."""
    count = maker.settings.num_samples
    return maker.make([""] * count, [[maker.tokenizer.eod]] * count, 0)


def input_file(maker: SampleMaker) -> list[Sample]:
    if maker.settings.sample_input_file is None:
        raise GenerationError("text_gen_type input-file needs 'sample_input_file' (or -i FILE)")
    prompts = read_prompts(maker.settings.sample_input_file, maker.settings.prompt_end)
    return maker.make(prompts, maker.encode(prompts), 0)


def read_interactive_prompts(read_line: Callable[[str], str], prompt_end: str) -> Iterator[str]:
    """Prompts typed by the user: lines are joined until the text contains prompt_end; EOF ends the session."""
    while True:
        text = ""
        label = INTERACTIVE_PROMPT
        while prompt_end not in text:
            try:
                line = read_line(label)
            except EOFError:
                if text.strip():
                    yield text.strip()
                return
            text += line + "\n"
            label = ""
        prompt = text[: text.index(prompt_end)].strip()
        if prompt:
            yield prompt


def interactive(maker: SampleMaker, rank: int, read_line: Callable[[str], str] = input) -> list[Sample]:
    """Rank 0 reads prompts from stdin and shares each with the other ranks; an empty share ends the loop."""
    prompts = read_interactive_prompts(read_line, maker.settings.prompt_end) if rank == 0 else None
    samples: list[Sample] = []
    index = 0
    while True:
        prompt = next(prompts, None) if prompts is not None else None
        prompt = _share_from_rank0(prompt)
        if prompt is None:
            if rank == 0:
                print(flush=True)  # end the unanswered prompt line
            return samples
        try:
            encoded = maker.encode([prompt])
        except GenerationError as err:  # every rank reaches the same verdict on the same text
            if rank == 0:
                print(f"neox.generate: {err}", flush=True)
            continue
        (sample,) = maker.make([prompt], encoded, index)
        index += 1
        samples.append(sample)
        if rank == 0:
            print(f"{sample.text}\n[{sample.tokens_generated} tokens, {sample.finish_reason}, "
                  f"{sample.seconds:.2f} s]", flush=True)


def _merge_from_all_ranks(mine: dict[int, Sample]) -> dict[int, Sample]:
    """Every rank's samples, by prompt index (ranks of one replica hold the same ones)."""
    parts: list[dict[int, Sample] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    return {i: sample for part in parts for i, sample in (part or {}).items()}


def _share_from_rank0(value: str | None) -> str | None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def generation_mode(settings: GenerateConfig) -> str:
    """text_gen_type, or when unset: input-file if sample_input_file is given, else unconditional."""
    if settings.text_gen_type is not None:
        return settings.text_gen_type
    return "input-file" if settings.sample_input_file else "unconditional"


DECODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_dtype(cfg: NeoXConfig, runtime: Runtime) -> torch.dtype:
    chosen = cfg.generate.decode_precision
    if chosen != "auto":
        if chosen == "fp16" and not runtime.is_cuda:
            raise ConfigError("'decode_precision: fp16' needs a GPU (CPU fp16 matmuls are emulated); use bf16 or fp32")
        return DECODE_DTYPES[chosen]
    if not runtime.is_cuda:
        return torch.float32  # CPU half-precision matmuls are slower than fp32 unless packed (decode_precision)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision, torch.float32)


@dataclass
class DecodingLayout:
    model: torch.nn.Module
    sync: TokenSync | None  # None: this rank is a replica on its own
    replica: int
    replicas: int


def decoding_layout(model: GPTNeoX, cfg: NeoXConfig, runtime: Runtime) -> DecodingLayout:
    """The model as this launch's layout runs it. Any checkpoint loads as one full model; model_parallel_size
    and pipe_parallel_size of the launched config decide how the ranks split it (they need not match the layout
    it was trained at), and the data-parallel replicas share out the batches."""
    from neox.generate.parallel_model import ParallelDecoder

    par = cfg.parallel
    if not par.is_model_parallel:
        return DecodingLayout(ParallelDecoder(model), None, runtime.rank, runtime.world_size)
    from neox.parallel.topology import build_topology

    decoder = ParallelDecoder(model, build_topology(par.model_parallel_size, par.pipe_parallel_size),
                              partition_method=par.pipe_partition_method)
    return DecodingLayout(decoder, TokenSync(decoder.sampling_rank, decoder.replica_group), decoder.replica,
                          decoder.replicas)


def run(cfg: NeoXConfig, runtime: Runtime) -> list[Sample]:
    from neox.checkpoint import load_model

    if cfg.train.load is None:
        raise GenerateError("generate needs 'load': the checkpoint directory to sample from (--load DIR)")
    model, ckpt_cfg, tokenizer = load_model(cfg.train.load, cfg.train.iteration, device=runtime.device,
                                             dtype=model_dtype(cfg, runtime))
    model.eval()
    if generation_mode(cfg.generate) == "precompute":  # reference log-probs of the data, no samples
        from neox.generate.precompute import precompute

        precompute(model, cfg, runtime)
        return []
    layout = decoding_layout(model, cfg, runtime)
    maker = SampleMaker(model=layout.model, tokenizer=tokenizer, settings=cfg.generate, seed=cfg.train.seed,
                        max_positions=ckpt_cfg.model.max_positions, device=runtime.device, sync=layout.sync,
                        replica=layout.replica, replicas=layout.replicas)
    mode = generation_mode(cfg.generate)
    if mode == "unconditional":
        samples = unconditional(maker)
    elif mode == "input-file":
        samples = input_file(maker)
    else:
        samples = interactive(maker, runtime.rank)
    if runtime.rank == 0:
        path = write_samples(cfg.generate.sample_output_file, samples)
        tokens = sum(s.tokens_generated for s in samples)
        print(f"neox.generate: {len(samples)} samples ({tokens} tokens) written to {path}", flush=True)
    return samples


_INPUT_ERRORS = (GenerateError, GenerationError, SamplingError, ConfigError, TokenizerError)


def _leave_process_group() -> None:
    """Every rank done, then an orderly gloo shutdown: a rank exiting while a peer's collective threads still run
    can abort the interpreter at exit ("terminate called without an active exception")."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _run(cfg: NeoXConfig, config_path: Path, runtime: Runtime) -> None:
    run(cfg, runtime)
    _leave_process_group()


PROGRAM = RankProgram(module="neox.generate", launch_command="deepy generate", description=__doc__.splitlines()[0],
                      body=_run, input_errors=_INPUT_ERRORS)


def main(argv: list[str] | None = None) -> int:
    return run_rank_program(PROGRAM, argv)
