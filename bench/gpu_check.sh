#!/usr/bin/env bash
# GPU check of the Dask launcher, in one go on a GPU machine that has torch and Lightning
# but no dask/distributed/dask-cuda and no internet:
#   1. installs the distributions it lacks from the wheels in $WHEELS (`make gpu-wheels`
#      fills wheels/ on a machine with internet; carry that folder along), into $SITE, not
#      over the machine's own packages;
#   2. runs bench/gpu_check.py against this checkout (PYTHONPATH, no pip install: the
#      package pins a torch the GPU image need not have), within $LIMIT seconds.
#
#   bench/gpu_check.sh [--dry] [--out figures.json]
#
# --dry: the same steps on a CPU machine (cluster 'local', gloo, bf16 on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
SITE=${SITE:-/tmp/aihpc-gpu-site}
LIMIT=${LIMIT:-290}  # the whole check must end within 5 minutes
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Wheels whose distribution is not importable yet (the machine's own versions win).
missing=$("$PYTHON" - "$WHEELS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        version(name)
    except PackageNotFoundError:
        print(wheel)
EOF
)
if [[ -n $missing ]]; then
    echo "installing into $SITE:" $missing
    # shellcheck disable=SC2086  # one path per word
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" $missing
fi
"$PYTHON" -c 'import dask, distributed; print("dask", dask.__version__, "distributed", distributed.__version__)'
exec timeout "$LIMIT" "$PYTHON" -u bench/gpu_check.py "$@"
