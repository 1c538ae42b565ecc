#!/usr/bin/env bash
# Everything a session with a GPU machine should run, in parts that each fit one device call
# (10 minutes at most per command, 15 minutes of device time per session: run "tests" and one more).
# Each part stays well inside 9 minutes of wall clock, writes its JSON row by row as it measures
# (a timeout loses only what had not run yet) and runs its most valuable rows first. Results land in
# $OUT (the device tool brings them back); copy the tables into benchmarks/RESULTS.md with the device.
#
#   part      what, in order                                                  wall-clock cap  expected
#   tests     pytest -m gpu (incl. data parallel over NCCL); limits.py (bandwidth, TFLOPS, AdamW, bound)      240 s + 200 s   ~4 min
#   profile   profile_step.py: torch.profiler trace of 3 steps at 1B + summary
#             (host step during backward), then the same clipping by norm    300 s + 200 s  ~4-6 min
#   speed     throughput.py: 1B megatrain, plain+ckpt; 3B megatrain, ZeRO-3
#             offload, FSDP offload (DeepSpeed needs .whl, fetch_deepspeed.sh) 500 s budget   ~8 min
#   long      long_context.py, 1B-class: offload on, then off; starts at 128k
#             tokens, a trial predicted over 100 s is not run                 480 s budget   ~6-8 min
#   lora      throughput.py, LoRA r=16 on all linear layers, bf16 base, 4 x 4096
#             tokens: megatrain on 59B (70B-shaped, 66 layers: the largest
#             whose plan fits 128 GiB host + 80 GB GPU); then 8B megatrain
#             and plain PEFT on the GPU (+ checkpointing)                     270 s + 175 s  ~5-7 min
#
# usage on the device:  PYTHONUNBUFFERED=1 benchmarks/gpu_session.sh tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && [ "${1:-tests}" = speed ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/*.whl .whl/*.tar.gz \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py tests/test_gpu_dp.py 2>&1 | tee "$OUT/pytest_gpu.txt"
    timeout 200 python3 benchmarks/limits.py --hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4 \
      --seq 4096 --batch 4 --out "$OUT/limits.json" 2>&1 | tee "$OUT/limits.txt"
    ;;
  profile)
    timeout 300 python3 benchmarks/profile_step.py --hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4 \
      --seq 4096 --batch 4 --warmup 2 --steps 3 --out-dir "$OUT" 2>&1 | tee "$OUT/profile.txt"
    timeout 200 python3 benchmarks/profile_step.py --hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4 \
      --seq 4096 --batch 4 --warmup 2 --steps 3 --clip 1.0 --out-dir "$OUT/clip" 2>&1 | tee "$OUT/profile_clip.txt"
    ;;
  speed)
    timeout 300 python3 benchmarks/throughput.py --sizes 1b --strategies megatrain plain_ckpt --seq 4096 --batch 4 \
      --steps 4 --warmup 2 --timeout 150 --budget 270 --out "$OUT/throughput_1b.json" 2>&1 | tee "$OUT/throughput_1b.txt"
    timeout 230 python3 benchmarks/throughput.py --sizes 3b --strategies megatrain deepspeed_stage_3_offload fsdp_offload \
      --seq 4096 --batch 4 --steps 3 --warmup 1 --timeout 120 --budget 215 --out "$OUT/throughput_3b.json" 2>&1 | tee "$OUT/throughput_3b.txt"
    ;;
  long)
    timeout 500 python3 benchmarks/long_context.py --hidden 2048 --layers 16 --intermediate 8192 --heads 16 --kv-heads 8 \
      --min-len 16384 --start-len 131072 --max-len 1048576 --resolution 65536 --chunk-mlp 16 --trial-cap 100 --budget 450 \
      --out "$OUT/long_context_1b.json" 2>&1 | tee "$OUT/long_context_1b.txt"
    ;;
  lora)
    timeout 270 python3 benchmarks/throughput.py --sizes 59b --strategies lora_megatrain --seq 4096 --batch 4 \
      --steps 2 --warmup 1 --timeout 255 --budget 260 --out "$OUT/throughput_lora_59b.json" 2>&1 | tee "$OUT/throughput_lora_59b.txt"
    timeout 175 python3 benchmarks/throughput.py --sizes 8b --strategies lora_megatrain lora_peft --seq 4096 --batch 4 \
      --steps 3 --warmup 2 --timeout 100 --budget 165 --out "$OUT/throughput_lora_8b.json" 2>&1 | tee "$OUT/throughput_lora_8b.txt"
    ;;
  *)
    echo "unknown part: $1 (tests | profile | speed | long | lora)"; exit 2 ;;
esac
