# Sourced by gpu/check.sh and gpu/test-gpu.sh (POSIX sh): sets `py` to the first Python whose torch sees a GPU
# ($GPU_PYTHON first, then the usual names), or to "" where there is none.
py=""
for candidate in ${GPU_PYTHON:-} python3 python3.12 python3.11 python; do
  command -v "$candidate" >/dev/null 2>&1 || continue
  if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    py=$candidate
    break
  fi
done
