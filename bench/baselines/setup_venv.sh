#!/usr/bin/env bash
# Create/refresh bench/.venv-baselines for bench/baselines/run_baseline.py.
#
# Why a separate venv: SDV/CTGAN/RDT are Business Source License (benchmark
# only, never imported by fedsynth) and smartnoise-synth pins opacus 0.14,
# which clashes with fedsynth's opacus 1.6. sdv and smartnoise-synth do
# resolve together, so one venv holds all four baselines.
#
# torch==2.13.0 (the CPU wheel on disk) is installed first and then pinned via
# a constraints file: a looser torch requirement could otherwise pull a
# multi-GB CUDA build. Idempotent: re-running is a no-op while the venv's
# stamp matches requirements-baselines.txt; FORCE=1 reinstalls.
# Usage: bash bench/baselines/setup_venv.sh   (from any cwd; PYTHON=python3.11 to override)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(dirname "$HERE")/.venv-baselines"
REQ="$HERE/requirements-baselines.txt"
PY="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"

"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "need Python 3.11 (torch 2.13.0 cp311 wheel); set PYTHON=" >&2; exit 1; }

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -z "${FORCE:-}" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && "$VENV/bin/python" -c 'import sdv, snsynth.aim, snsynth.pytorch.nn.dpctgan' 2>/dev/null; then
  echo "$VENV is up to date"; exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the venv out of git, as Python 3.13's venv does
printf 'torch==2.13.0\n' > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -r "$REQ"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c 'import sdv, snsynth.aim, snsynth.pytorch.nn.dpctgan, torch; print("ok: torch", torch.__version__, "sdv", sdv.__version__)'
echo "$want" > "$STAMP"
echo "ready: $VENV/bin/python $HERE/run_baseline.py --help"
