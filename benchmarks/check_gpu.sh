#!/usr/bin/env bash
# Is igd right on this GPU node? One command, one verdict line per check (PASS/FAIL with its figures), then the
# bench; about ten minutes on one H100. Options are benchmarks/check_gpu.py's:
#   benchmarks/check_gpu.sh                    # on CUDA; results into benchmarks/results/
#   benchmarks/check_gpu.sh --cpu-dry-run      # every check on the CPU at tiny sizes (the test suite runs this)
#   benchmarks/check_gpu.sh --data-dir DIR     # where the CIFAR-10 and MNIST data files are
# Exit code: 0 when every check passes, 1 when one fails, 2 on bad options or no CUDA device.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
exec "${PYTHON:-python}" benchmarks/check_gpu.py "$@"
