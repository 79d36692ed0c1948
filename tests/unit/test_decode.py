"""The decoding loop against transformers' generate on the exported model, and its stopping rules, seeds,
packed GEMM, prompt/sample files and the interactive reader."""
from __future__ import annotations

import json

import pytest
import torch

from neox.config.model import ModelConfig
from neox.generate.decode import DecodeRequest, GenerationError, StopStrings, decode, left_pad
from neox.generate.parallel_model import ParallelDecoder
from neox.generate.packed import PackedLinear, pack_for_decoding, packed_gemm_available
from neox.generate.run import read_interactive_prompts
from neox.generate.samples_io import Sample, read_prompts, write_samples
from neox.generate.sampling import SamplingParams
from neox.model import GPTNeoX
from neox.model.hf import model_cfg_to_hf_config, to_hf_state_dict

VOCAB = 100  # the tokenizer's; the embedding is padded to 128
PROMPT_LENGTHS = (3, 9, 1, 14, 6)
NEW_TOKENS = 64


def _cfg(**changes) -> ModelConfig:
    # A GPT-NeoX (Pythia-style) model; a large init std gives peaked logits, so no argmax is a near-tie.
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, pos_emb="rotary",
                rotary_pct=0.25, gpt_j_residual=True, norm="layernorm", activation="gelu", padded_vocab_size=128,
                init_method_std=0.3, hidden_dropout=0.0, attention_dropout=0.0)
    return ModelConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def model() -> GPTNeoX:
    torch.manual_seed(0)
    return GPTNeoX(_cfg()).eval()


@pytest.fixture(scope="module")
def hf_model(model: GPTNeoX):
    from transformers import GPTNeoXForCausalLM

    cfg = model.cfg
    hf = GPTNeoXForCausalLM(model_cfg_to_hf_config(cfg, "gpt_neox", vocab_size=VOCAB)).eval()
    hf.load_state_dict(to_hf_state_dict(cfg, model.state_dict(), "gpt_neox", vocab_size=VOCAB))
    return hf


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(hf, prompt: list[int], use_cache: bool) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("wrapped", [False, True], ids=["GPTNeoX", "ParallelDecoder"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recompute"])
def test_greedy_equals_transformers_generate_token_for_token(model, hf_model, prompts, use_cache, wrapped) -> None:
    expected = [_hf_greedy(hf_model, p, use_cache) for p in prompts]
    assert all(len(e) == NEW_TOKENS for e in expected)
    if wrapped:  # what `deepy generate` decodes with on one device (logits of the last position only)
        model = ParallelDecoder(model)
    request = DecodeRequest(max_new_tokens=NEW_TOKENS, vocab_size=VOCAB, use_cache=use_cache)
    batched = decode(model, prompts, request)  # one left-padded batch of five lengths
    assert [c.tokens for c in batched] == expected
    assert all(c.finish_reason == "length" for c in batched)
    alone = [decode(model, [p], request)[0].tokens for p in prompts]
    assert alone == expected


def test_hf_left_padded_batch_agrees_with_ours(model, hf_model, prompts) -> None:
    tokens, mask = left_pad(prompts, pad=0)
    with torch.inference_mode():
        out = hf_model.generate(tokens, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    ours = decode(model, prompts, DecodeRequest(max_new_tokens=16, vocab_size=VOCAB))
    assert [c.tokens for c in ours] == out[:, tokens.shape[1]:].tolist()


def test_padded_vocabulary_rows_are_never_chosen(model, prompts) -> None:
    boosted = GPTNeoX(model.cfg).eval()
    boosted.load_state_dict(model.state_dict())
    with torch.no_grad():  # make a padding row the most likely token everywhere
        boosted.head.weight[120] = boosted.head.weight[:VOCAB].abs().max(dim=0).values * 50
    unrestricted = decode(boosted, prompts[:2], DecodeRequest(max_new_tokens=5))
    assert any(120 in c.tokens for c in unrestricted)
    restricted = decode(boosted, prompts[:2], DecodeRequest(max_new_tokens=5, vocab_size=VOCAB))
    assert all(t < VOCAB for c in restricted for t in c.tokens)


def test_sampling_is_reproducible_and_cache_equals_recompute(model, prompts) -> None:
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    seeds = [7, 8, 9, 10, 11]
    run = lambda use_cache, s=seeds: [  # noqa: E731
        c.tokens for c in decode(model, prompts, DecodeRequest(32, params, VOCAB, use_cache=use_cache), seeds=s)]
    first = run(True)
    assert first == run(True)
    assert first == run(False)
    assert run(True, [17, 8, 9, 10, 11])[0] != first[0]
    # A prompt's sample depends on its seed, not on the batch it ran in.
    alone = decode(model, [prompts[3]], DecodeRequest(32, params, VOCAB), seeds=[10])[0].tokens
    assert alone == first[3]


def test_eod_ends_a_sequence_and_is_not_part_of_it(model, prompts) -> None:
    free = decode(model, prompts, DecodeRequest(max_new_tokens=20, vocab_size=VOCAB))
    eod = free[1].tokens[6]
    ended = decode(model, prompts, DecodeRequest(max_new_tokens=20, vocab_size=VOCAB, eod=eod))
    for before, after in zip(free, ended):
        if eod in before.tokens:
            assert after.tokens == before.tokens[: before.tokens.index(eod)]
            assert after.finish_reason == "eod"
        else:
            assert after.tokens == before.tokens and after.finish_reason == "length"
    assert ended[1].finish_reason == "eod" and len(ended[1].tokens) <= 6


def test_stop_strings_cut_the_text_before_the_stop(model, prompts) -> None:
    letters = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)  # noqa: E731 - a toy detokenizer
    free = decode(model, prompts[:1], DecodeRequest(max_new_tokens=20, vocab_size=VOCAB))[0].tokens
    stop_text = letters(free[5:7])
    first_hit = letters(free).find(stop_text)
    result = decode(model, prompts[:1], DecodeRequest(max_new_tokens=20, vocab_size=VOCAB),
                    stop=StopStrings([stop_text, "no such text"], letters))[0]
    assert result.finish_reason == "stop"
    assert result.text == letters(free)[:first_hit]
    assert result.tokens == free[: len(result.tokens)] and len(result.tokens) <= 7
    with pytest.raises(GenerationError, match="empty"):
        StopStrings([""], letters)


def test_generation_stops_at_the_model_positions(model, prompts) -> None:
    request = DecodeRequest(max_new_tokens=50, vocab_size=VOCAB, max_positions=20)
    results = decode(model, prompts, request)
    longest = max(PROMPT_LENGTHS)
    assert all(len(c.tokens) == 20 - longest and c.finish_reason == "length" for c in results)
    with pytest.raises(GenerationError, match="no room"):
        decode(model, prompts, DecodeRequest(max_new_tokens=5, max_positions=longest))
    with pytest.raises(GenerationError, match="at least one token"):
        decode(model, [[]], DecodeRequest(max_new_tokens=5))


def test_return_logits_gives_the_chosen_tokens_logits(model, prompts) -> None:
    result = decode(model, prompts[:1], DecodeRequest(max_new_tokens=4, vocab_size=VOCAB, return_logits=True))[0]
    sequence = prompts[0] + result.tokens
    with torch.no_grad():
        full = model(torch.tensor([sequence]))[0]
    start = len(prompts[0]) - 1
    expected = [float(full[start + i, t]) for i, t in enumerate(result.tokens)]
    assert result.logits == pytest.approx(expected, abs=1e-4)


@pytest.mark.skipif(not packed_gemm_available(), reason="this torch has no MKL packed GEMM")
def test_packed_linears_match_plain_and_keep_the_parameters() -> None:
    torch.manual_seed(3)
    plain = GPTNeoX(_cfg(no_weight_tying=True)).eval()
    packed = GPTNeoX(_cfg(no_weight_tying=True)).eval()
    packed.load_state_dict(plain.state_dict())
    assert pack_for_decoding(packed, rows=2)
    swapped = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(swapped) == 2 * 4 + 1  # qkv, dense, linear1, linear2 per block, and the head
    assert set(packed.state_dict()) == set(plain.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens), plain(tokens), atol=1e-5, rtol=1e-5)  # packed path (2 rows)
        torch.testing.assert_close(packed(tokens.view(1, 2)), plain(tokens.view(1, 2)))  # fallback path
    with torch.no_grad():  # a weight changed in place after packing is used as it is now, never the stale copy
        for net in (plain, packed):
            net.head.weight.mul_(2.0)
        torch.testing.assert_close(packed(tokens), plain(tokens), atol=1e-5, rtol=1e-5)
    assert pack_for_decoding(packed, rows=2)
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens), plain(tokens), atol=1e-5, rtol=1e-5)
    assert not pack_for_decoding(GPTNeoX(_cfg()).to(torch.float16), rows=2)  # no packed fp16 GEMM


@pytest.mark.skipif(not packed_gemm_available(torch.bfloat16), reason="this torch has no oneDNN bf16 GEMM")
def test_bf16_packed_linears_match_plain_bf16_and_follow_a_dtype_change() -> None:
    torch.manual_seed(4)
    plain = GPTNeoX(_cfg(no_weight_tying=True)).eval()
    packed = GPTNeoX(_cfg(no_weight_tying=True)).eval()
    packed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, VOCAB, (3, 1))
    assert pack_for_decoding(packed, rows=3)  # packed in fp32 (MKL) ...
    packed.to(torch.bfloat16)  # ... then cast: the stale fp32 packing must not be used
    plain.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens), plain(tokens))  # dtype changed: plain F.linear
        assert pack_for_decoding(packed, rows=3)
        assert all(m._packed.is_mkldnn for m in packed.modules() if isinstance(m, PackedLinear))
        out = packed(tokens)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, plain(tokens), atol=2e-2, rtol=2e-2)  # bf16 rounding, other order


def test_read_prompts_text_jsonl_and_prompt_end(tmp_path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n  second one  \n", encoding="utf-8")
    assert read_prompts(text) == ["first prompt", "second one"]
    multi = tmp_path / "multi.txt"
    multi.write_text("line a\nline b<END>other<END>\n", encoding="utf-8")
    assert read_prompts(multi, prompt_end="<END>") == ["line a\nline b", "other"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "p1", "id": 1}\n\n{"text": "t2"}\n', encoding="utf-8")
    assert read_prompts(jsonl) == ["p1", "t2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no key"}\n', encoding="utf-8")
    with pytest.raises(GenerationError, match=r"bad.jsonl:2: no string 'prompt' or 'text'"):
        read_prompts(bad)
    with pytest.raises(GenerationError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(GenerationError, match="holds no prompt"):
        read_prompts(empty)


def test_write_samples_is_jsonl_and_leaves_no_temporary(tmp_path) -> None:
    samples = [Sample("a", " b", 1, "length", 0.5, [5]), Sample("c", "", 0, "eod", 0.25, [], logits=[])]
    path = write_samples(tmp_path / "out" / "samples.jsonl", samples)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[0] == {"prompt": "a", "text": " b", "tokens_generated": 1, "finish_reason": "length",
                          "seconds": 0.5, "tokens": [5]}
    assert records[1]["logits"] == [] and records[1]["finish_reason"] == "eod"
    assert [p.name for p in path.parent.iterdir()] == ["samples.jsonl"]


def test_interactive_prompts_join_lines_until_prompt_end() -> None:
    def reader(lines: list[str]):
        feed = iter(lines)

        def read_line(_label: str) -> str:
            try:
                return next(feed)
            except StopIteration:
                raise EOFError from None
        return read_line

    assert list(read_interactive_prompts(reader(["hello", "", "world"]), "\n")) == ["hello", "world"]
    assert list(read_interactive_prompts(reader(["a", "b END", "c"]), "END")) == ["a\nb", "c"]


def test_deepy_short_forms_become_overrides(tmp_path, monkeypatch) -> None:
    from launcher.deepy import generate_short_forms, pull_short_options

    monkeypatch.chdir(tmp_path)
    pulled, rest = pull_short_options(["--load", "ckpt", "-o", "out.jsonl", "--eval_tasks", "a", "b", "--x=1",
                                       "-i", "p.txt"])
    assert pulled == ["-o", "out.jsonl", "-i", "p.txt"]
    assert rest == ["--load", "ckpt", "--eval_tasks", "a", "b", "--x=1"]
    assert generate_short_forms("p.txt", "out.jsonl") == [
        "--text_gen_type", "input-file", "--sample_input_file", str(tmp_path / "p.txt"),
        "--sample_output_file", str(tmp_path / "out.jsonl")]
    assert generate_short_forms(None, None) == []


def test_sample_maker_keeps_prompt_order_and_seeds_whatever_the_batching() -> None:
    from neox.config.generate import GenerateConfig
    from neox.generate.run import SampleMaker, generation_mode
    from neox.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("CharLevelTokenizer", None, None)
    torch.manual_seed(0)
    net = GPTNeoX(_cfg(padded_vocab_size=512)).eval()
    prompts = ["a long prompt of many characters", "hi", "medium prompt", "x", "another fairly long one"]

    def make(batch_size: int, temperature: float) -> list:
        settings = GenerateConfig(maximum_tokens=10, temperature=temperature, top_k=50,
                                  generate_batch_size=batch_size, return_logits=True)
        maker = SampleMaker(net, tokenizer, settings, seed=5, max_positions=128, device=torch.device("cpu"))
        return maker.make(prompts, maker.encode(prompts), first_index=0)

    for temperature in (0.0, 1.0):
        one_batch, pairs = make(5, temperature), make(2, temperature)
        assert [s.prompt for s in one_batch] == prompts
        assert [s.tokens for s in one_batch] == [s.tokens for s in pairs]
        for s in one_batch:
            assert s.text == tokenizer.decode(s.tokens) and s.tokens_generated == len(s.tokens) == len(s.logits)
    assert generation_mode(GenerateConfig()) == "unconditional"
    assert generation_mode(GenerateConfig(sample_input_file="p.txt")) == "input-file"
    assert generation_mode(GenerateConfig(text_gen_type="interactive", sample_input_file="p.txt")) == "interactive"
    with pytest.raises(GenerationError, match="no room to generate|positions"):
        SampleMaker(net, tokenizer, GenerateConfig(), seed=5, max_positions=4, device=torch.device("cpu")).encode(
            ["five!"])


@pytest.mark.parametrize("choice,precision,cuda,expected", [
    ("auto", "bf16", False, torch.float32),    # CPU: fp32 unless asked, whatever the training precision
    ("auto", "bf16", True, torch.bfloat16),    # GPU: the training precision
    ("bf16", "fp32", False, torch.bfloat16),   # asked for: bf16 weights on the CPU (AMX/AVX512-BF16 decode)
    ("fp32", "bf16", True, torch.float32),
    ("fp16", "fp32", False, None),             # refused on the CPU, naming the key
])
def test_decode_precision_picks_the_weight_dtype(choice, precision, cuda, expected) -> None:
    from types import SimpleNamespace

    from neox.config.errors import ConfigError
    from neox.generate.run import model_dtype

    cfg = SimpleNamespace(generate=SimpleNamespace(decode_precision=choice), optim=SimpleNamespace(precision=precision))
    runtime = SimpleNamespace(is_cuda=cuda)
    if expected is None:
        with pytest.raises(ConfigError, match="decode_precision"):
            model_dtype(cfg, runtime)
    else:
        assert model_dtype(cfg, runtime) == expected


def test_bf16_decoding_follows_the_fp32_model_to_bf16_rounding(model, prompts) -> None:
    # The bf16 decode path (packed oneDNN GEMMs on the CPU) scores the fp32 model's own greedy tokens: every step's
    # logits stay within bf16 rounding of the fp32 logits for the same prefix.
    request = DecodeRequest(max_new_tokens=8, sampling=SamplingParams(temperature=0.0), vocab_size=VOCAB)
    ids = torch.tensor([prompts[0]])
    reference = decode(model, [prompts[0]], request)[0]
    bf16_model = GPTNeoX(model.cfg).to(torch.bfloat16)
    bf16_model.load_state_dict(model.state_dict())
    bf16_model.eval()
    with torch.no_grad():
        full = torch.tensor([prompts[0] + reference.tokens])
        fp32_logits = model(full).float()
        bf16_logits = bf16_model(full).float()
    scale = fp32_logits.abs().max()
    assert (bf16_logits - fp32_logits).abs().max() / scale < 3e-2
    out = decode(bf16_model, [prompts[0]], request)[0]
    assert len(out.tokens) == 8 and all(0 <= t < model.cfg.padded_vocab_size for t in out.tokens)
    with torch.no_grad():
        prefill = bf16_model(ids).float()  # the same shapes as decode's prefill: the same bf16 rounding
    assert out.tokens[0] == int(prefill[0, -1, :VOCAB].argmax())
