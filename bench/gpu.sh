#!/usr/bin/env bash
# The GPU checks in one call, for a lent CUDA machine (the `device` tool; see README, Speed):
#   1. the suite's tests on the paths that only run with CUDA (precision=auto's GPU choices, the
#      trainer options, the distributed equivalences), with CUDA visible;
#   2. bench/train_step.py --device cuda: ResNet-50 at 224 px and PIC multi-crop, each speed
#      option on/off, fraction of the GPU's dense bf16 peak;
#   3. a 2-minute launch.py run on synthetic data (224 px, ResNet-50, precision=auto), its
#      results.json printed.
# Everything goes to $OUT (or ./gpu-out): gpu.log and the run's results.json.
# Usage: PEAK_TFLOPS=989 bash bench/gpu.sh   (dense bf16 peak; H100/H200 SXM: 989, H200 NVL: 835)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
py=${PY:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
peak=${PEAK_TFLOPS:-989}
log="$out/gpu.log"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'bf16', torch.cuda.is_bf16_supported())"
  echo "== 1. tests on the CUDA paths"
  timeout 240 "$py" -m pytest -q -p no:cacheprovider -m "not slurm and not slow" \
    tests/test_trainer_options.py tests/test_distributed.py tests/test_pic_scale.py
  echo "== 2. bench/train_step.py --device cuda"
  timeout 240 "$py" bench/train_step.py --device cuda --peak-tflops "$peak"
  echo "== 3. two minutes of launch.py on synthetic data"
  timeout 180 "$py" launch.py data=synthetic data.image_size=224 data.num_images=50000 \
    backbone=resnet50 trainer.batch_size=256 trainer.max_steps=200 trainer.num_workers=12 \
    logger=none hydra.run.dir="$out/run"
  cat "$out/run/results.json" 2>/dev/null | head -40
} 2>&1 | tee "$log"
