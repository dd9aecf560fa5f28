#!/usr/bin/env bash
# Creates (or refreshes) the repo's own virtual environment `.venv` from the pinned requirement
# files. Idempotent: when the requirement files have not changed since the last install it does
# nothing. Used by the README's commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(cat requirements-test.txt requirements-nodeps.txt requirements-ui.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet -r requirements-test.txt -r requirements-ui.txt
# These packages declare dependencies (CUDA torch, torchvision, pytorch-lightning 1.4, ...) that the
# parts we import do not need; see the comments in the file.
.venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
echo "$want" > "$stamp"
