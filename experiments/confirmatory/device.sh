#!/usr/bin/env bash
# A confirmatory study on an accelerator host without TensorFlow (README.md beside this file):
#   bash experiments/confirmatory/device.sh SUBSET_NPZ PARALLEL --study deep56 [run.py options]
# SUBSET_NPZ: `python -m sdjax.data.npz_export --dataset=cifar10 --split=5000,0,1024 --out=...`.
# PARALLEL processes share the device, each training the next unclaimed run of the plan; the
# records go to results/runs/<study>/ as on CPU, and the table is regenerated at the end.
# Pure-Python wheels in experiments/fullscale/wheels/ (ml_collections) go on the path as zips.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash experiments/confirmatory/device.sh SUBSET_NPZ PARALLEL [run.py options]" >&2
  exit 2
fi
npz="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
parallel="$2"
shift 2
cd "$(dirname "$0")/../.."
source experiments/fullscale/pythonpath.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for k in $(seq "$parallel"); do
  python -m experiments.confirmatory.run --npz="$npz" "$@" > "confirmatory_device_$k.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
tail -n 3 confirmatory_device_*.log
python -m experiments.confirmatory.run "$@" --aggregate_only
exit "$status"
