#!/usr/bin/env bash
# The paper's full-scale CIFAR-10 experiment in one command (see README.md):
#   bash experiments/fullscale/run.sh /path/to/cifar10.npz [--seeds=0,1,2] [--out=DIR] ...
# Pure-Python wheels in experiments/fullscale/wheels/ (e.g. ml_collections) are put on the path
# as zip archives: nothing is installed and no network is used.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash experiments/fullscale/run.sh CIFAR10_NPZ [run.py options]" >&2
  exit 2
fi
npz="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
# A file carried in parts (`split -b 60M X.npz X.npz.part-`, one part per transfer) is joined
# once, in the parts' name order, when X.npz itself is not there yet.
if [ ! -e "$npz" ] && compgen -G "$npz.part-*" > /dev/null; then
  cat "$npz".part-* > "$npz.joining"
  mv "$npz.joining" "$npz"
  echo "joined $(compgen -G "$npz.part-*" | wc -l) parts into $npz" >&2
fi
cd "$(dirname "$0")/../.."
source experiments/fullscale/pythonpath.sh
exec python -m experiments.fullscale.run --npz="$npz" "$@"
