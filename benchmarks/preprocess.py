"""Benchmark: tools/preprocess_data.py end to end vs its peers, every one measured in the same run.

On the bench corpus with GPT-2 BPE and --append-eod, measures in one run:
  - ours: wall time of the real CLI as a subprocess (start-up included), 1 and 2 workers, as
    threads (the default) and as processes;
  - gpt-neox's tools/datasets/preprocess_data.py, end to end the same way (GPT2BPETokenizer, 1 and 2 workers),
    when --gpt-neox DIR names a gpt-neox checkout (it needs gpt-neox's own packages, e.g. lm_dataformat and ftfy:
    --gpt-neox-python names the interpreter of an environment that has them); without it that peer is reported
    as not measured, and nothing is judged against it;
  - tiktoken encode_ordinary_batch on the same documents held in memory, 1 and 2 threads;
  - HF tokenizers on the same documents: encode() one by one (1 thread) and encode_batch (its
    Rayon pool over every core).
Every measurement runs --repeats times; the rounds alternate their order (reversed in odd rounds) so a shared
machine's load falls on all alike, and each figure is the median with its spread (quartiles, min, max). The
targets: >= 3x gpt-neox's tool at the same worker count and >= 0.7x tiktoken's raw rate at the same thread count.
--quick runs on the corpus's first documents, to check that the benchmark works, not to measure. JSON goes to
--output (default stdout).

    python benchmarks/preprocess.py --output benchmarks/results/preprocess.json [--gpt-neox ../gpt-neox]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from spread import summary, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEOX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEFAULT_CORPUS = SHARED_DATA / "bench" / "mixed-50mb.jsonl.zst"
GPT2_VOCAB = REPO_ROOT / "data" / "tokenizers" / "gpt2" / "vocab.json"
GPT2_MERGES = REPO_ROOT / "data" / "tokenizers" / "gpt2" / "merges.txt"
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT_NEOX_SCRIPT = Path("tools") / "datasets" / "preprocess_data.py"
QUICK_DOCUMENTS = 2000

GPT_NEOX_FACTOR_TARGET = 3.0
RAW_FRACTION_TARGET = 0.7


def gpt2_tiktoken():
    """GPT-2 as a tiktoken Encoding built from the bundled vocab/merges (no download)."""
    import tiktoken

    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    byte_of = {chr(b): b for b in visible}
    shifted = 0
    for b in range(256):
        if b not in visible:
            byte_of[chr(0x100 + shifted)] = b
            shifted += 1
    vocab = json.loads(GPT2_VOCAB.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-bench", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})


def gpt2_hf():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(GPT2_VOCAB), str(GPT2_MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def run_cli(name: str, command: list[str], prefix: Path, cwd: Path) -> tuple[float, int]:
    """(wall seconds, tokens written) of one preprocessing CLI run; its output files are removed."""
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {completed.returncode}): {' '.join(command)}\n"
                           f"{completed.stderr.strip()[-2000:]}")
    bin_path = Path(f"{prefix}_text_document.bin")
    tokens = bin_path.stat().st_size // 2  # uint16 tokens: GPT-2's vocabulary fits
    for ext in (".bin", ".idx"):
        Path(f"{prefix}_text_document{ext}").unlink()
    return wall, tokens


def ours_command(corpus: Path, workers: int, kind: str, prefix: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
            "--output-prefix", str(prefix), "--tokenizer-type", "HFGPT2Tokenizer",
            "--vocab-file", str(GPT2_VOCAB), "--merge-file", str(GPT2_MERGES), "--append-eod",
            "--workers", str(workers), "--worker-kind", kind]


def gpt_neox_command(checkout: Path, python: str, corpus: Path, workers: int, prefix: Path) -> list[str]:
    return [python, str(checkout / GPT_NEOX_SCRIPT), "--input", str(corpus), "--output-prefix", str(prefix),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_VOCAB),
            "--merge-file", str(GPT2_MERGES), "--append-eod", "--workers", str(workers)]


class Measurements:
    """Named timed measurements, each run once per round; a round runs them in order, or reversed (odd rounds)."""

    def __init__(self):
        self._runs: dict[str, Callable[[], tuple[float, int]]] = {}
        self._info: dict[str, dict] = {}
        self.seconds: dict[str, list[float]] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, run: Callable[[], tuple[float, int]], **info) -> None:
        self._runs[name], self._info[name], self.seconds[name] = run, info, []

    def run_rounds(self, rounds: int) -> None:
        for r in range(rounds):
            names = list(self._runs) if r % 2 == 0 else list(reversed(self._runs))
            for name in names:
                seconds, tokens = self._runs[name]()
                self.seconds[name].append(seconds)
                self.tokens.setdefault(name, tokens)
                if tokens != self.tokens[name]:
                    raise RuntimeError(f"{name} wrote {tokens} tokens in round {r + 1}, {self.tokens[name]} before")
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)

    def report(self, name: str) -> dict:
        seconds = summary(self.seconds[name])
        return {**self._info[name], "seconds": seconds, "tokens": self.tokens[name],
                "tokens_per_s": round(self.tokens[name] / seconds["median"])}


def in_memory(encode: Callable[[], list[list[int]]]) -> Callable[[], tuple[float, int]]:
    def run() -> tuple[float, int]:
        start = time.perf_counter()
        ids = encode()
        seconds = time.perf_counter() - start
        return seconds, sum(map(len, ids))
    return run


def measure(corpus: Path, repeats: int, gpt_neox: Path | None, gpt_neox_python: str, quick: bool) -> dict:
    from neox.data.sources import iter_texts
    from tools.preprocess_data import resolve_worker_kind

    results: dict = {
        "corpus": str(corpus),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "method": {"repeats": repeats, "quick": quick,
                   "order": "every measurement once per round, the order reversed in odd rounds",
                   "statistic": "median wall seconds with quartiles, min and max; tokens/s from the median"},
    }
    with tempfile.TemporaryDirectory(prefix="neox-bench-") as tmp:
        tmp_dir = Path(tmp)
        texts = list(itertools.islice(iter_texts([corpus]), QUICK_DOCUMENTS if quick else None))
        if quick:
            corpus = tmp_dir / "quick.jsonl"
            corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
            results["corpus"] += f" (first {len(texts)} documents)"
        runs = Measurements()
        for kind in ("thread", "process"):
            for workers in (1, 2):
                prefix = tmp_dir / f"ours-{kind}-{workers}"
                runs.add(f"ours_{kind}_{workers}", lambda p=prefix, w=workers, k=kind: run_cli(
                    "tools/preprocess_data.py", ours_command(corpus, w, k, p), p, REPO_ROOT),
                    workers=workers, kind=kind)
        if gpt_neox is not None:
            for workers in (1, 2):
                prefix = tmp_dir / f"gpt-neox-{workers}"
                runs.add(f"gpt_neox_{workers}", lambda p=prefix, w=workers: run_cli(
                    f"gpt-neox's {GPT_NEOX_SCRIPT} (it needs gpt-neox's requirements: lm_dataformat, ftfy, "
                    "transformers 4; --gpt-neox-python names an environment that has them)",
                    gpt_neox_command(gpt_neox, gpt_neox_python, corpus, w, p), p, gpt_neox),
                    workers=workers, kind="process", checkout=str(gpt_neox))
        encoding = gpt2_tiktoken()
        for threads in (1, 2):
            runs.add(f"tiktoken_{threads}", in_memory(
                lambda t=threads: encoding.encode_ordinary_batch(texts, num_threads=t)), threads=threads)
        hf = gpt2_hf()
        runs.add("hf_tokenizers_1", in_memory(lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts]),
                 threads=1, how="encode() per document")
        runs.add("hf_tokenizers_batch", in_memory(lambda: [e.ids for e in hf.encode_batch(
            texts, add_special_tokens=False)]), threads=os.cpu_count(), how="encode_batch (Rayon, all cores)")
        runs.run_rounds(repeats)

    ours = {f"{kind}_{workers}": runs.report(f"ours_{kind}_{workers}")
            for kind in ("thread", "process") for workers in (1, 2)}
    results["ours_end_to_end"] = ours
    results["gpt_neox_end_to_end"] = (
        {str(w): runs.report(f"gpt_neox_{w}") for w in (1, 2)} if gpt_neox is not None else
        {"measured": False, "why": "no --gpt-neox DIR (a gpt-neox checkout) was given"})
    results["raw_in_memory_encode"] = {name: runs.report(name) for name in (
        "tiktoken_1", "tiktoken_2", "hf_tokenizers_1", "hf_tokenizers_batch")}
    results["documents"] = len(texts)

    targets = {}
    for workers in (1, 2):
        default_kind = resolve_worker_kind("auto", workers)
        rate = ours[f"{default_kind}_{workers}"]["tokens_per_s"]
        other = ours[f"{'process' if default_kind == 'thread' else 'thread'}_{workers}"]["tokens_per_s"]
        tiktoken_rate = results["raw_in_memory_encode"][f"tiktoken_{workers}"]["tokens_per_s"]
        target = {
            "ours_default_kind": default_kind,
            "ours_default_tokens_per_s": rate,
            "default_kind_was_faster_this_run": rate >= other,
            "vs_tiktoken_raw": round(rate / tiktoken_rate, 2),
            "tiktoken_target": RAW_FRACTION_TARGET,
            "meets_tiktoken_target": None if quick else rate >= RAW_FRACTION_TARGET * tiktoken_rate,
            "gpt_neox_target": GPT_NEOX_FACTOR_TARGET,
        }
        if gpt_neox is None:
            target.update(vs_gpt_neox=None, meets_gpt_neox_target=None)
        else:
            peer = results["gpt_neox_end_to_end"][str(workers)]
            peer_rate = peer["tokens_per_s"]
            target.update(vs_gpt_neox=round(rate / peer_rate, 2),
                          meets_gpt_neox_target=None if quick else rate >= GPT_NEOX_FACTOR_TARGET * peer_rate,
                          same_token_count_as_gpt_neox=peer["tokens"] == ours[f"{default_kind}_{workers}"]["tokens"])
        targets[f"workers_{workers}"] = target
    results["targets"] = targets
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here (default: stdout)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: runs of every measurement (default 3)")
    parser.add_argument("--gpt-neox", type=Path, default=None, metavar="DIR",
                        help=f"a gpt-neox checkout: its {GPT_NEOX_SCRIPT} runs as a peer")
    parser.add_argument("--gpt-neox-python", default=sys.executable, metavar="PYTHON",
                        help="the interpreter that runs gpt-neox's script (default: this one)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the corpus's first {QUICK_DOCUMENTS} documents: checks the benchmark runs")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(f"error: benchmark corpus {args.corpus} not found (set NEOX_SHARED_DATA or pass --corpus)",
              file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.gpt_neox is not None and not (args.gpt_neox / GPT_NEOX_SCRIPT).is_file():
        print(f"error: --gpt-neox {args.gpt_neox} has no {GPT_NEOX_SCRIPT}: give the root of a gpt-neox checkout",
              file=sys.stderr)
        return 2
    gpt_neox = args.gpt_neox.resolve() if args.gpt_neox is not None else None
    try:
        results = measure(args.corpus, args.repeats, gpt_neox, args.gpt_neox_python, args.quick)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_json(results, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
