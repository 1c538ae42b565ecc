#!/usr/bin/env bash
# Everything a session with a GPU machine should run, in parts that each fit one device call
# (10 minutes at most per command, 15 minutes of device time per session). Results land in $OUT
# (the device tool brings them back); copy the tables into benchmarks/RESULTS.md with the device name.
#
#   part "tests":  pytest -m gpu, then benchmarks/limits.py                        (~3 min)
#   part "speed":  throughput: 1B megatrain vs plain+checkpointing; 3B megatrain vs
#                  deepspeed_stage_3_offload vs FSDP CPU offload (needs .whl from fetch_deepspeed.sh)
#   part "long":   long_context.py for a 1B-class model, offload off and on
#
# usage on the device:  PYTHONUNBUFFERED=1 benchmarks/gpu_session.sh tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/*.whl .whl/*.tar.gz \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
    timeout 200 python3 benchmarks/limits.py --hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4 \
      --seq 4096 --batch 4 --out "$OUT/limits.json" 2>&1 | tee "$OUT/limits.txt"
    ;;
  speed)
    timeout 280 python3 benchmarks/throughput.py --sizes 1b --strategies megatrain plain_ckpt plain --seq 4096 --batch 4 \
      --steps 4 --warmup 2 --out "$OUT/throughput_1b.json" 2>&1 | tee "$OUT/throughput_1b.txt"
    timeout 300 python3 benchmarks/throughput.py --sizes 3b --strategies megatrain deepspeed_stage_3_offload fsdp_offload \
      --seq 4096 --batch 4 --steps 3 --warmup 1 --timeout 280 --out "$OUT/throughput_3b.json" 2>&1 | tee "$OUT/throughput_3b.txt"
    ;;
  long)
    timeout 580 python3 benchmarks/long_context.py --hidden 2048 --layers 16 --intermediate 8192 --heads 16 --kv-heads 8 \
      --min-len 65536 --max-len 1048576 --resolution 65536 --chunk-mlp 16 --out "$OUT/long_context_1b.json" 2>&1 | tee "$OUT/long_context_1b.txt"
    ;;
  *)
    echo "unknown part: $1 (tests | speed | long)"; exit 2 ;;
esac
