#!/usr/bin/env bash
# The whole GPU check in one call (issue 27): on a bare machine with CUDA, from the checkout's root,
#   bash gpu/check.sh            # about 6 minutes on one H100 (each step's expected minutes below and in the README)
# It needs, in the checkout (both ignored by git, together about 36 MB, so they travel with it):
#   gpu-data/     the two CIFAR-10 files: `bash gpu/check.sh --prepare` copies them from ../shared/data
#   gpu-wheels/   what a CUDA image with PyTorch, SciPy, scikit-learn, seaborn and pytest lacks: `make gpu-wheels`
# It uses the machine's own Python and torch and installs nothing from an index. Each step is time-stamped in
# $OUT/check.log (OUT defaults to gpu-check/); its log and numbers land beside it, and $OUT/check.json lists
# every step with its exit status and seconds. Without CUDA it says so in one line and exits 0.
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
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/check.log"; }
# step NAME LOGFILE COMMAND...: runs it, its output into $OUT/LOGFILE, and records status and seconds
step() {
  local name=$1 file=$2 start rc
  shift 2
  log "$name ..."
  start=$(date +%s)
  "$@" > "$OUT/$file" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"log\": \"$file\"}")
  log "$name: exit $rc in $(( $(date +%s) - start )) s ($file)"
  tail -n 3 "$OUT/$file" | sed 's/^/    /' | tee -a "$OUT/check.log"
}

log "gpu/check.sh on $(hostname): $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, torch.cuda.get_device_name(0))')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/check.log" 2>&1

# what the image lacks, from ./gpu-wheels only (its list: gpu/requirements.txt)
if ! "$py" -c 'import pyautoattack, torchattacks, openTSNE' >/dev/null 2>&1; then
  [ -d gpu-wheels ] || { log "packages are missing and there is no ./gpu-wheels: run 'make gpu-wheels' first"; exit 2; }
  step "install from ./gpu-wheels" install.log "$py" -m pip install --no-index --find-links gpu-wheels --no-deps \
    -r gpu/requirements.txt
fi
[ -f "$DATA/cifar10-mini.npz" ] && [ -f "$DATA/cifar10-jpeg.tar.xz" ] || {
  log "the CIFAR-10 files are not in $DATA/: run 'bash gpu/check.sh --prepare' where ../shared/data exists"; exit 2; }
export AFS_KIT_SHARED_DATA=$PWD/$DATA PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

# 1. the device tests (make test-gpu): about 2 minutes
step "device tests (make test-gpu)" test-gpu.log env GPU_PYTHON="$py" sh gpu/test-gpu.sh
# 2. the GPU benchmarks, quick sizes (WRN-28-10, see benchmarks/README.md): about 2 minutes
step "GPU benchmarks (quick)" bench.log "$py" -m benchmarks --quick --device cuda --json "$OUT/bench.json"
# 3. a CIFAR-10 AFS run: the cifar10-fast preset cut to three extractors of 5 epochs. PreActResNet-18 on a batch
#    of 128: forward 0.142 TFLOP, forward + backward 0.426 (torch.utils.flop_counter, measured on the CPU); an
#    FGSM-RS step is two of those (0.85 TFLOP), a budget-0 step one. 5 epochs of 391 steps at 0, 4 and 8/255 are
#    4.2 PFLOP: 18 s at 30% of the H100's 790 TFLOP/s bf16 peak; about 2 minutes with the JPEG decoding (50,000
#    images, once), the validation checks, the merger (2 epochs of PGD-5 through the three networks) and the
#    evaluation (clean, PGD-10, PGD-20 and AutoAttack's APGD-CE and APGD-DLR on the 1,000 lossless test images:
#    about 1.5 PFLOP; masking checks on 100)
run=$OUT/run
spec="train-test:folder:$DATA/cifar10-jpeg.tar.xz|npz:$DATA/cifar10-mini.npz"
cut=(--preset cifar10-fast --run "$run" --device cuda --set "data.spec=$spec" --set "data.root=$OUT/data"
     --set "budgets=0,4/255,8/255" --set extractor.epochs=5)
cifar10_run() {  # `step` runs it in this shell, with its output in afs.log
  "$py" -m afs_kit train-extractors "${cut[@]}" &&
    "$py" -m afs_kit train-merger --run "$run" --subset all --device cuda &&
    "$py" -m afs_kit evaluate --run "$run" --model afs --attacks clean,pgd10,pgd20,aa --n 1000 --device cuda \
      --set evaluation.aa_attacks=apgd-ce,apgd-dlr --set evaluation.sanity_examples=100
}
step "CIFAR-10 AFS run (cifar10-fast cut: 0, 4, 8/255, 5 epochs)" afs.log cifar10_run
cp "$run"/eval/afs-*/metrics.json "$OUT/afs-metrics.json" 2>/dev/null
rm -rf "$run" "$OUT/data"  # only logs and numbers come back

printf '{"python": "%s", "steps": [%s]}\n' "$py" "$(IFS=,; echo "${steps[*]}")" > "$OUT/check.json"
log "done: $(( ${#steps[@]} - failed )) of ${#steps[@]} steps passed"
[ "$failed" -eq 0 ]
