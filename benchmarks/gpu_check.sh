#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it runs and writes):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --budget 400 --only kernel_check]
#
# The GPU machine has torch, Triton and transformers but not pydantic and its dependencies: when the Python lacks
# them and .whl/ holds wheels (README "GPU check" says which, and how to download them), they are installed into a
# private folder first and put on PYTHONPATH with the repository. Ends within about 8 minutes: the Python side keeps
# to its --budget (420 s), and a hard timeout stops it at 470 s (the JSON then holds every section finished so far).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [options]}
shift
mkdir -p "$out"
python=${PYTHON:-python3}
if "$python" -c "import pydantic, pydantic_settings, click, rich" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # an environment that has them (a developer's): no wheels
elif compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/secateurs-gpu-check-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in .whl/ (pydantic and its dependencies must then be installed already)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi || echo "gpu_check: nvidia-smi failed"; } 2>&1 | tee "$out/gpu_check.log"
timeout -k 15 470 "$python" benchmarks/gpu_check.py "$out" "$@" 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
