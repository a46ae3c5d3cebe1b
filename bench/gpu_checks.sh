#!/usr/bin/env bash
# Issue 13, item 5: the GPU rows, prepared to run in ONE call of a lent GPU machine (the session's
# device tool), so that its 15 minutes go to measuring, not to setting up:
#   here, once:   make gpu-wheels     # what the GPU image lacks (smp, rasterio, pydantic, ...) as cp312 wheels in .whl/
#   on the GPU:   run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=540)
# Each step's output lands in $OUT/<step>.txt, with the GPU's utilisation sampled every 200 ms
# while it ran ($OUT/<step>.gpu.csv: utilization.gpu = % of the time a kernel was running) and a
# one-line summary in $OUT/summary.txt. Steps:
#   train_step  bench_train_step.py --device cuda: bare SMP loop vs our fit() (fp32, AMP, default)
#   predict     bench_predict.py --device cuda: 2 models x 3 scales x 3 flips over 480x320 tiles and a
#               4000 px GeoTIFF against the bare forward passes (overhead_pct)
#   loader      bench_loader.py with configs/gpu.yaml's loader (8 workers, batch 8, 512 px tiles)
#   stage       a real pretraining stage on the GPU with configs/gpu.yaml (seg-pipeline train):
#               train/data_wait_fraction per epoch and the GPU's busy share (goal: >= 90 % busy)
# A CPU dry run of the same commands at toy sizes (what the suite cannot check):
#   DEVICE=cpu GRID=4 TILE=128 EPOCHS=2 QUICK=1 OUT=/tmp/gpu_dry PYTHON=.venv/bin/python bash bench/gpu_checks.sh
# The stage's mean utilisation counts validation and the end-of-stage prediction too; its
# per-epoch `data wait` lines are the loader's share of the training loop.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
DEVICE=${DEVICE:-cuda}
GRID=${GRID:-24}      # synthetic scene of GRID x GRID tiles for the loader and the stage
TILE=${TILE:-512}
EPOCHS=${EPOCHS:-3}
QUICK=${QUICK:-0}     # 1: toy sizes for the benches too (dry run)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the carried wheels only where the interpreter lacks the project's packages (the GPU image does)
if ! $PY -c "import rasterio, segmentation_models_pytorch, pydantic, mlflow" 2>/dev/null \
  && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
WORK=$(mktemp -d /tmp/gpu_checks.XXXX)

{
  date -u +%FT%TZ
  grep -m1 'model name' /proc/cpuinfo; echo "cpus: $(nproc)"
  echo "flags: $(grep -o -w 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, sample the GPU meanwhile, note rc, wall and mean busy
  local name=$1 limit=$2; shift 2
  local smi="" started rc
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
      >"$OUT/$name.gpu.csv" 2>/dev/null &
    smi=$!
  fi
  echo "== $name: $*" | tee "$OUT/$name.txt"
  started=$(date +%s.%N)
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  rc=$?
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  local wall busy="n/a"
  wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  # mean utilisation over the whole step, and from the first to the last sample that saw a kernel
  # (the GPU's active stretch, without the imports and set-up before it)
  [ -s "$OUT/$name.gpu.csv" ] && busy=$(awk -F', ' '{v[NR] = $2; if ($2 > 0) {if (!f) f = NR; l = NR}}
    END {for (i = 1; i <= NR; i++) s += v[i]; for (i = f; f && i <= l; i++) a += v[i];
         printf "%.1f (active stretch %.1f over %d samples)", NR ? s / NR : 0, f ? a / (l - f + 1) : 0, f ? l - f + 1 : 0}' \
    "$OUT/$name.gpu.csv")
  printf '%s rc=%s wall_s=%s mean_gpu_util_pct=%s\n' "$name" "$rc" "$wall" "$busy" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.txt"
}

if [ "$QUICK" = 1 ]; then
  step train_step 120 $PY bench/bench_train_step.py --device "$DEVICE" --size 64 --batch 2 --steps 2 --rounds 1 --warmup 1
  step predict 300 $PY bench/bench_predict.py --device "$DEVICE" --tiles 1 --side 256 --seam-side 0
  step loader 300 $PY bench/bench_loader.py --rows "$GRID" --cols "$GRID" --tile-size "$TILE" --workers 2 \
    --batch-size 4 --epochs 2 --work "$WORK/loader"
else
  step train_step 150 $PY bench/bench_train_step.py --device cuda --size 512 --batch 8 --steps 30 --rounds 2 --threads 8
  step predict 150 $PY bench/bench_predict.py --device cuda --tiles 19 --side 4000
  step loader 120 $PY bench/bench_loader.py --rows "$GRID" --cols "$GRID" --tile-size "$TILE" --workers 8 \
    --batch-size 8 --epochs 3 --work "$WORK/loader"
fi

# A real stage: synthetic raw tiles -> seg-pipeline ingest -> seg-pipeline train with configs/gpu.yaml.
DATA=$WORK/data
$PY -m seg_pipeline.data.synthetic --out "$DATA/raw/gpu_synth" --seed 0 --rows "$GRID" --cols "$GRID" \
  --tile-size "$TILE" >"$OUT/stage_data.txt" 2>&1 \
  && $PY -m seg_pipeline.cli --data-root "$DATA" ingest --config configs/gpu.yaml --dataset gpu_synth \
    >>"$OUT/stage_data.txt" 2>&1 || { echo "stage data failed:"; tail -n 20 "$OUT/stage_data.txt"; }
step stage 240 $PY -m seg_pipeline.cli --data-root "$DATA" train --stage pretrain --config configs/gpu.yaml \
  --dataset gpu_synth --no-tracking --experiment-dir "$WORK/stage" \
  "loop.epochs=$EPOCHS" "loop.device=$DEVICE" loop.save_every=0 loop.early_stopping_patience=null
grep -h "data wait" "$OUT/stage.txt" | tail -n "$EPOCHS"
echo "== summary"; cat "$OUT/summary.txt"
rm -rf "$WORK"
