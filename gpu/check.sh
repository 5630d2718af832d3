#!/usr/bin/env bash
# The whole GPU check in one call (issue 27): on a bare machine with CUDA, from the checkout's root,
#   bash gpu/check.sh            # at most 8 minutes (CHECK_LIMIT_S=470 s of steps), each step's measured minutes below
# It needs, in the checkout (both ignored by git, together about 36 MB, so they travel with it):
#   gpu-data/     the two CIFAR-10 files: `bash gpu/check.sh --prepare` copies them from ../shared/data
#   gpu-wheels/   what a CUDA image with PyTorch, SciPy, scikit-learn, seaborn and pytest lacks: `make gpu-wheels`
# It uses the machine's own Python and torch and installs nothing from an index. Each step is time-stamped in
# $OUT/check.log (OUT defaults to gpu-check/); its log and numbers land beside it, and $OUT/check.json lists
# every step with its exit status and seconds. Without CUDA it says so in one line and exits 0.
# Every step has a time limit, and all of them together CHECK_LIMIT_S: a step that would start with under
# 20 s left is recorded as skipped, one that runs over is stopped (exit 124), so the call always comes back
# with its logs. First run, on an H100 (benchmarks/gpu/2026-12-06-h100/): no limits, and the call's own
# 500 s limit stopped it in the AFS run's AutoAttack, with none of its numbers written.
set -u
cd "$(dirname "$0")/.." || exit 2
DATA=${GPU_DATA:-gpu-data}

if [ "${1:-}" = "--prepare" ]; then  # on the CPU machine, before the call: the data files into the checkout
  mkdir -p "$DATA" && cp ../shared/data/cifar10-mini.npz ../shared/data/cifar10-jpeg.tar.xz "$DATA"/ || exit 2
  du -sh "$DATA" gpu-wheels 2>/dev/null
  exit 0
fi

. gpu/cuda-python.sh
if [ -z "$py" ]; then
  echo "gpu/check.sh: no CUDA on this machine (no Python whose torch sees a GPU): skipped"
  exit 0
fi

OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
: > "$OUT/check.log"
steps=()
failed=0
deadline=$(( $(date +%s) + ${CHECK_LIMIT_S:-470} ))
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/check.log"; }
# step NAME LOGFILE LIMIT_S COMMAND...: runs it under `timeout` (LIMIT_S, or what is left of CHECK_LIMIT_S if
# less), its output into $OUT/LOGFILE, and records status and seconds
step() {
  local name=$1 file=$2 limit=$3 start rc left
  shift 3
  left=$(( deadline - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, $left s left of CHECK_LIMIT_S"
    failed=$((failed + 1))
    steps+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": true, \"log\": \"$file\"}")
    return
  fi
  log "$name (at most $limit s) ..."
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$file" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit, \"log\": \"$file\"}")
  log "$name: exit $rc$([ "$rc" -eq 124 ] && echo ' (stopped at its time limit)') in $(( $(date +%s) - start )) s ($file)"
  { tail -n 3 "$OUT/$file"; echo; } | tr '\r' '\n' | grep -v '^ *$' | tail -n 3 | sed 's/^/    /' | tee -a "$OUT/check.log"
}

log "gpu/check.sh on $(hostname): $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, torch.cuda.get_device_name(0))')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/check.log" 2>&1

# what the image lacks, from ./gpu-wheels only (its list: gpu/requirements.txt): 2 s
if ! "$py" -c 'import pyautoattack, torchattacks, openTSNE' >/dev/null 2>&1; then
  [ -d gpu-wheels ] || { log "packages are missing and there is no ./gpu-wheels: run 'make gpu-wheels' first"; exit 2; }
  step "install from ./gpu-wheels" install.log 60 "$py" -m pip install --no-index --find-links gpu-wheels --no-deps \
    -r gpu/requirements.txt
fi
[ -f "$DATA/cifar10-mini.npz" ] && [ -f "$DATA/cifar10-jpeg.tar.xz" ] || {
  log "the CIFAR-10 files are not in $DATA/: run 'bash gpu/check.sh --prepare' where ../shared/data exists"; exit 2; }
export AFS_KIT_SHARED_DATA=$PWD/$DATA AFS_BENCH_DATA=$PWD/$DATA/cifar10-mini.npz PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export py DATA OUT PYTHONUNBUFFERED=1

# 1. the device tests (make test-gpu): 172 s on the H100 (19 tests, the cifar10-fast end-to-end case among them)
step "device tests (make test-gpu)" test-gpu.log 210 env GPU_PYTHON="$py" sh gpu/test-gpu.sh

# 2. a CIFAR-10 AFS run: the cifar10-fast preset cut to three extractors (0, 4, 8/255) of 3 epochs, a merger of
#    1 epoch, the evaluation on 500 test images. Measured on the H100 at 5 epochs, a 2-epoch merger and 1,000
#    images: 25 s to unpack and decode the 50,000 JPEGs; 4 s per budget-0 epoch and 7.5 s per FGSM-RS epoch of
#    PreActResNet-18 (batch 128, bf16; 50 steps/s, so about 45 TFLOP/s of the 0.85 TFLOP per step measured with
#    torch.utils.flop_counter: 6% of the bf16 peak, the small network and the data pipeline bound it), 2 min for
#    the three networks with their validation; the merger 51 s per epoch (PGD-5 through three networks, 10
#    steps/s at batch 100); PGD-10 and PGD-20 on 1,000 images 2.7 s and 4.7 s. So here: about 25 + 75 + 51 s
#    of training, then AutoAttack's APGD-CE/DLR on 500 and the masking checks on 100 (not measured: the first
#    run was stopped 40 s into AutoAttack's first chunk of 250): about 4 minutes in all.
run=$OUT/run
export run spec="train-test:folder:$DATA/cifar10-jpeg.tar.xz|npz:$DATA/cifar10-mini.npz"
cifar10_run() {  # a function run by `timeout bash -c`: it sees only what is exported above
  "$py" -m afs_kit train-extractors --preset cifar10-fast --run "$run" --device cuda --set "data.spec=$spec" \
      --set "data.root=$OUT/data" --set "budgets=0,4/255,8/255" --set extractor.epochs=3 --set merger.epochs=1 &&
    "$py" -m afs_kit train-merger --run "$run" --subset all --device cuda &&
    "$py" -m afs_kit evaluate --run "$run" --model afs --attacks clean,pgd10,pgd20,aa --n 500 --device cuda \
      --set evaluation.aa_attacks=apgd-ce,apgd-dlr --set evaluation.sanity_examples=100
}
export -f cifar10_run
step "CIFAR-10 AFS run (cifar10-fast cut: 0, 4, 8/255, 3 epochs, 500 test images)" afs.log 270 bash -c cifar10_run
cp "$run"/eval/afs-*/metrics.json "$OUT/afs-metrics.json" 2>/dev/null
rm -rf "$run" "$OUT/data"  # only logs and numbers come back

# 3. the GPU benchmarks at WRN-28-10 scale, quick sizes, the cases that run on the GPU (AutoAttack's case uses a
#    small CNN and t-SNE runs on the CPU: the CPU suite has them): not yet measured on a GPU (the first run
#    stopped at the missing AFS_BENCH_DATA); whatever time is left
step "GPU benchmarks (quick: extractor, merger, PGD)" bench.log 200 "$py" -m benchmarks --quick --device cuda \
  --cases extractor_epoch,merger_epoch,pgd --json "$OUT/bench.json"

printf '{"python": "%s", "steps": [%s]}\n' "$py" "$(IFS=,; echo "${steps[*]}")" > "$OUT/check.json"
log "done: $(( ${#steps[@]} - failed )) of ${#steps[@]} steps passed"
[ "$failed" -eq 0 ]
