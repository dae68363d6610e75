#!/usr/bin/env bash
# The CUDA path on one GPU (run on a lent GPU machine; results go to $OUT, then are copied to
# experiments/results/cuda/ by hand): the CUDA-marked tests, calibration of a one-GPU cluster
# (bf16 matmul rate, device memory; NCCL), and a Hugging Face GPT-2 planned on that file and run
# checked on one NCCL rank.
set -uo pipefail
OUT=${OUT:-experiments/results/cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_calibrate.py \
  2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
python3 -m autoddl.cli calibrate --nproc 1 -o "$OUT/one_gpu.toml" 2>&1 | tee "$OUT/calibrate.txt"
MODEL=hf-gpt2:layers=4,hidden=256,heads=8,seq=128,batch=16,vocab=1024
{ python3 -m autoddl.cli plan --model "$MODEL" --cluster "$OUT/one_gpu.toml" --backend highs \
    -o "$OUT/hf_gpt2_plan.json"
  python3 -m autoddl.cli run "$OUT/hf_gpt2_plan.json" --nproc 1 --check --steps 3; } 2>&1 \
  | grep -v Warning | tee "$OUT/hf_gpt2_run.txt"
