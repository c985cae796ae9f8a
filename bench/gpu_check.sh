#!/usr/bin/env bash
# The project's one prepared GPU check (DEVELOPERS.md): CUDA tests, stages 02 and 03 on cuda, and
# throughput figures, into $OUT/gpu_check.json. Needs no network: the machine's own python3 and
# packages, plus the espeakng-loader wheel in bench/wheels/ (stage 01 synthesizes speech with it).
#
#   bench/gpu_check.sh                               # on a GPU machine (about 5 minutes on one H100)
#   bench/gpu_check.sh --device cpu --size tiny      # the same steps at a tiny size, on CPU (a test runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import espeakng_loader" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links bench/wheels espeakng-loader
fi
exec timeout 570 "$PY" bench/gpu_check.py "$@"
