#!/usr/bin/env bash
# `make demo`: the main job on the bundled corpus, end to end, as a user would run it.
# usage: tools/demo.sh   (needs .venv, which `make demo` sets up; paths come from configs/local_setup.yml)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
corpus=data/corpora/kjv.jsonl.zst,data/corpora/austen.jsonl.zst,data/corpora/shakespeare.jsonl.zst
run_dir=runs/demo            # save/load/log_dir of configs/local_setup.yml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/7 train a 4k-token BPE tokenizer on the bundled corpus (KJV, Austen, Shakespeare)"
"$py" tools/train_tokenizer.py --input "$corpus" --vocab-size 4096 --output runs/data/demo-tokenizer.json

echo "== 2/7 preprocess the corpus into mmap token shards"
"$py" tools/preprocess_data.py --input "$corpus" --output-prefix runs/data/demo \
    --tokenizer-type HFTokenizer --vocab-file runs/data/demo-tokenizer.json --append-eod --workers 2
"$py" tools/inspect_dataset.py --prefix runs/data/demo_text_document

echo "== 3/7 train configs/tiny.yml on 2 CPU ranks with ZeRO-2 (a fresh run: the previous demo run is removed)"
rm -rf "$run_dir"
"$py" launcher/deepy.py train -d configs tiny.yml cpu.yml local_setup.yml

echo "== 4/7 training summary"
"$py" - "$run_dir/logs/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if "lm_loss" in r]
valid = [r for r in records if "valid_loss" in r]
test = [r for r in records if "test_loss" in r]
print(f"train loss: {train[0]['lm_loss']:.3f} at iteration {train[0]['iteration']} -> "
      f"{train[-1]['lm_loss']:.3f} at iteration {train[-1]['iteration']}")
for r in valid:
    print(f"valid loss {r['valid_loss']:.3f}, valid perplexity {r['valid_ppl']:.1f} at iteration {r['iteration']}")
for r in test:
    print(f"test loss {r['test_loss']:.3f}, test perplexity {r['test_ppl']:.1f}")
last = train[-1]
print(f"throughput: {last['tokens_per_sec']:.0f} tokens/s on 2 ranks, MFU {last['mfu']:.1%}")
PY

echo "== 5/7 loss curve"
"$py" tools/plot_metrics.py "$run_dir/logs" --output "$run_dir/loss.png" --title "tiny.yml on the bundled corpus"
echo "checkpoints: $(cat "$run_dir/checkpoints/latest") in $run_dir/checkpoints"

echo "== 6/7 evaluate the checkpoint with lm-evaluation-harness (PIQA, ARC-Easy; 200 questions each) and perplexity"
"$py" launcher/deepy.py eval -d configs tiny.yml cpu.yml local_setup.yml \
    --eval_tasks piqa arc_easy perplexity --eval_limit 200

echo "== 7/7 generate from five prompts on 2 ranks (top-p sampling)"
"$py" launcher/deepy.py generate -d configs tiny.yml cpu.yml local_setup.yml \
    -i data/prompts/demo.txt -o "$run_dir/samples.jsonl" \
    --maximum_tokens 40 --temperature 0.8 --top_p 0.9
"$py" - "$run_dir/samples.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    sample = json.loads(line)
    print(f"{sample['prompt']!r} -> {sample['text']!r}")
PY
