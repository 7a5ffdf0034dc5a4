# Sourced, from the repository root, by the scripts that run on a host where nothing is
# installed (run.sh here, experiments/confirmatory/device.sh): puts the repository and every
# pure-Python wheel in experiments/fullscale/wheels/ (as a zip archive) on PYTHONPATH.
for wheel in experiments/fullscale/wheels/*.whl; do
  [ -e "$wheel" ] && PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
