"""Benchmark: tools/preprocess_data.py end to end vs the raw in-memory encode rate of its peers.

On the bench corpus with GPT-2 BPE and --append-eod, measures in one run:
  - ours: wall time of the real CLI as a subprocess (start-up included), 1 and 2 workers, as
    threads (the default) and as processes;
  - tiktoken encode_ordinary_batch on the same documents held in memory, 1 and 2 threads;
  - HF tokenizers on the same documents: encode() one by one (1 thread) and encode_batch (its
    Rayon pool over every core);
and the ratios against the targets: >= 3x gpt-neox's tool at the same worker count and >= 0.7x
tiktoken's raw rate at the same thread count. JSON goes to --output (default stdout).

    python benchmarks/preprocess.py --output benchmarks/results/preprocess.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEOX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEFAULT_CORPUS = SHARED_DATA / "bench" / "mixed-50mb.jsonl.zst"
GPT2_VOCAB = REPO_ROOT / "data" / "tokenizers" / "gpt2" / "vocab.json"
GPT2_MERGES = REPO_ROOT / "data" / "tokenizers" / "gpt2" / "merges.txt"
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# gpt-neox's tools/datasets/preprocess_data.py on this corpus, GPT-2 BPE, --append-eod, on this
# kind of machine (2 cores), wall time including its ~3.7 s start-up: tokens/s (low, high).
UPSTREAM_TOKENS_PER_S = {1: (352_000, 381_000), 2: (532_000, 547_000)}
UPSTREAM_FACTOR_TARGET = 3.0
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


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_cli(corpus: Path, workers: int, kind: str, out_dir: Path) -> dict:
    prefix = out_dir / f"bench-{kind}-{workers}"
    command = [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
               "--output-prefix", str(prefix), "--tokenizer-type", "HFGPT2Tokenizer",
               "--vocab-file", str(GPT2_VOCAB), "--merge-file", str(GPT2_MERGES), "--append-eod",
               "--workers", str(workers), "--worker-kind", kind]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"preprocess_data.py failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
    bin_path = Path(f"{prefix}_text_document.bin")
    tokens = bin_path.stat().st_size // 2  # uint16 tokens
    idx_bytes = Path(f"{prefix}_text_document.idx").stat().st_size
    for ext in (".bin", ".idx"):
        Path(f"{prefix}_text_document{ext}").unlink()
    return {"workers": workers, "kind": kind, "wall_s": round(wall, 3), "tokens": tokens,
            "bin_bytes": tokens * 2, "idx_bytes": idx_bytes, "tokens_per_s": round(tokens / wall),
            "summary": completed.stdout.strip().splitlines()[-1]}


def measure(corpus: Path, repeats: int) -> dict:
    from neox.data.sources import iter_texts
    from tools.preprocess_data import resolve_worker_kind

    load_before = os.getloadavg()
    results: dict = {
        "corpus": str(corpus),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in load_before]},
        "note": "wall-clock figures on a shared 2-core machine: noisy; best of --repeats runs",
    }
    with tempfile.TemporaryDirectory(prefix="neox-bench-") as tmp:
        ours = {}
        for kind in ("thread", "process"):
            for workers in (1, 2):
                runs = [run_cli(corpus, workers, kind, Path(tmp)) for _ in range(repeats)]
                ours[f"{kind}_{workers}"] = max(runs, key=lambda r: r["tokens_per_s"])
        results["ours_end_to_end"] = ours

    texts = list(iter_texts([corpus]))
    encoding = gpt2_tiktoken()
    raw = {}
    for threads in (1, 2):
        best = None
        for _ in range(repeats):
            seconds, ids = timed(lambda: encoding.encode_ordinary_batch(texts, num_threads=threads))
            tokens = sum(map(len, ids))
            del ids
            best = min(best or seconds, seconds)
        raw[f"tiktoken_{threads}"] = {"threads": threads, "seconds": round(best, 3), "tokens": tokens,
                                      "tokens_per_s": round(tokens / best)}
    hf = gpt2_hf()
    seconds, ids = timed(lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts])
    raw["hf_tokenizers_1"] = {"threads": 1, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds),
                              "how": "encode() per document"}
    seconds, ids = timed(lambda: hf.encode_batch(texts, add_special_tokens=False))
    raw["hf_tokenizers_batch"] = {"threads": os.cpu_count(), "seconds": round(seconds, 3),
                                  "tokens_per_s": round(tokens / seconds), "how": "encode_batch (Rayon, all cores)"}
    results["raw_in_memory_encode"] = raw
    results["documents"] = len(texts)

    targets = {}
    for workers in (1, 2):
        default_kind = resolve_worker_kind("auto", workers)
        rate = ours[f"{default_kind}_{workers}"]["tokens_per_s"]
        other = ours[f"{'process' if default_kind == 'thread' else 'thread'}_{workers}"]["tokens_per_s"]
        upstream_high = UPSTREAM_TOKENS_PER_S[workers][1]
        tiktoken_rate = raw[f"tiktoken_{workers}"]["tokens_per_s"]
        targets[f"workers_{workers}"] = {
            "ours_default_kind": default_kind,
            "ours_default_tokens_per_s": rate,
            "default_kind_was_faster_this_run": rate >= other,
            "vs_upstream_high": round(rate / upstream_high, 2),
            "upstream_target": UPSTREAM_FACTOR_TARGET,
            "meets_upstream_target": rate >= UPSTREAM_FACTOR_TARGET * upstream_high,
            "vs_tiktoken_raw": round(rate / tiktoken_rate, 2),
            "tiktoken_target": RAW_FRACTION_TARGET,
            "meets_tiktoken_target": rate >= RAW_FRACTION_TARGET * tiktoken_rate,
        }
    results["targets"] = targets
    results["upstream_tokens_per_s"] = {str(k): list(v) for k, v in UPSTREAM_TOKENS_PER_S.items()}
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here (default: stdout)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the best is kept")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(f"error: benchmark corpus {args.corpus} not found (set NEOX_SHARED_DATA or pass --corpus)",
              file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    results = measure(args.corpus, args.repeats)
    text = json.dumps(results, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
