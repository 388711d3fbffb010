#!/usr/bin/env bash
# The GPU session's one prepared run: build, the CUDA tests, the op microbenchmarks and the FPSR speed
# test with random-weight models of realistic size (CUDA graphs and the draft stream on, and off for
# comparison), and the sequential modes' decode with and without CUDA graphs beside transformers'
# generate (bench/token_speed.py). Everything lands in ${OUT:-gpu_out}/. Budget: about 10 minutes on an H100/H200.
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh
#
# The device machine has no model cache: before the call, copy SmolLM2's tokenizer into an ignored
# folder that travels (run's `carry`):
#   echo /.carry/ >> .git/info/exclude; mkdir -p .carry/tok
#   cp ~/.cache/dreamr/models/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .carry/tok/
#   head -20 ../shared/data/gsm8k/test_dev.jsonl > .carry/test_dev.jsonl
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.txt"; exit 1; }
python -m pytest -q tests/test_ops_cuda.py tests/test_fpsr_decode_graphs.py tests/test_sequence_graphs.py 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15
python bench/latency.py --json "$OUT/latency.json" > "$OUT/latency.txt" 2>&1; tail -25 "$OUT/latency.txt"
timeout 360 python bench/e2e_fpsr.py cheap --device cuda --dtype bfloat16 \
  --hidden 1536 --layers 28 --intermediate 8960 --draft-hidden 896 --draft-layers 24 --draft-intermediate 4864 \
  --tokenizer .carry/tok --data "${DATA:-.carry/test_dev.jsonl}" --problems 4 --max-new-tokens 96 --max-step-tokens 24 --accept 0.5 0.9 \
  --fpsr-variants target_launch=on_reject cuda_graphs=off,draft_stream=off \
  --json "$OUT/e2e_fpsr_cheap.json" > "$OUT/e2e_fpsr_cheap.txt" 2>&1
tail -30 "$OUT/e2e_fpsr_cheap.txt"
# the sequential modes' decode from CUDA graphs (default on CUDA) against the same modes eager and
# transformers' generate (plain, prompt lookup, static cache), random 1.5B target / 0.5B draft
timeout 200 python bench/token_speed.py --random-models .carry/tok --device cuda --dtype bfloat16 \
  --data "${DATA:-.carry/test_dev.jsonl}" --n 3 --max-new-tokens 64 \
  --variants generate generate+pld generate+static target "target[cuda_graphs=off]" token \
             "token[cuda_graphs=off]" speculative@1.0 "speculative@1.0[cuda_graphs=off]" \
  --out "$OUT/token_speed_random.json" > "$OUT/token_speed_random.txt" 2>&1
tail -16 "$OUT/token_speed_random.txt"
