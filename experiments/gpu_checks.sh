#!/usr/bin/env bash
# The accelerator figures docs/benchmarks.md asks for, in one short run on one GPU (or
# TPU chip): B/16 in bf16 at a realistic batch, as uniform (SigLIP), JEST and Flexi-JEST
# side by side (step time, XLA TFLOP, achieved TFLOP/s, MFU), then joint selection at
# N = 65,536 and 163,840.
#
#   PEAK=989 BATCH=1024 bash experiments/gpu_checks.sh 2>&1 | tee gpu_checks.txt
#
# PEAK: the device's dense peak TFLOP/s in bf16 (NVIDIA's H100/H200 SXM datasheets give
# 1,979 with sparsity, i.e. 989 dense). remat is off, so XLA's FLOPs are the model's and
# the MFU column is model FLOPs utilisation. BATCH: the learner batch b (JEST scores
# 5·b candidates); lower it if the device runs out of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
PEAK=${PEAK:-989}
BATCH=${BATCH:-1024}
PAPER="model=B,fsdp=1,reference=unused"
$PY experiments/bench_train.py --steps 10 --vocab 32000 --peak-tflops "$PEAK" \
    --set batch_size="$BATCH" --set model.remat=False \
    --config "configs/paper/siglip.py:model=B,fsdp=1" \
    --config "configs/paper/jest.py:$PAPER" \
    --config "configs/paper/jest.py:$PAPER,flexi=True"
$PY experiments/bench_selection.py --sizes 65536,163840 --repeats 3
