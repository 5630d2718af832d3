#!/bin/sh
# `make test-gpu`: the device-dependent tests (tests/core/test_device.py, the kill-and-resume tests) on CUDA, with the Python this machine
# already has and its own CUDA-enabled torch. Nothing comes from a package index: a missing package is taken
# from ./gpu-wheels, which `make gpu-wheels` fills beforehand on a machine that has an index.
set -u
cd "$(dirname "$0")/.." || exit 2
. gpu/cuda-python.sh
if [ -z "$py" ]; then
  echo "make test-gpu: no CUDA on this machine (no Python whose torch sees a GPU): nothing to test"
  exit 0
fi
echo "make test-gpu: $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, torch.cuda.get_device_name(0))')"
if ! "$py" -c 'import pyautoattack, torchattacks, openTSNE, pytest, sklearn, seaborn' >/dev/null 2>&1; then
  if [ ! -d gpu-wheels ]; then
    echo "make test-gpu: packages are missing and there is no ./gpu-wheels: run 'make gpu-wheels' where an index is reachable and copy the folder here"
    exit 2
  fi
  # only what a CUDA image with PyTorch lacks (gpu/requirements.txt), without dependencies: the image's stay
  "$py" -m pip install -q --no-index --find-links gpu-wheels --no-deps -r gpu/requirements.txt || exit 2
fi
AFS_TEST_DEVICE=cuda PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m pytest -q -p no:cacheprovider tests/core/test_device.py \
  tests/eval/test_reliability.py -k "test_device or killed"
