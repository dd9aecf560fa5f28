#!/usr/bin/env bash
# CI leg on the oldest stack GCFG claims to support (README, "Requirements"): the WebUI 1.10.1 pins and torch 2.1.2
# on Python 3.10 (3.11 where 3.10 is missing), in its own ignored venv `.venv-old`, built from the repo's own
# requirement files (requirements-oldstack*.txt) and reused while they do not change. Runs the engine tests, the
# fake-WebUI glue tests and a tiny real training run (prepare -> 3 steps -> stop -> resume -> publish).
set -euo pipefail
cd "$(dirname "$0")/.."
# The first Python 3.10 that runs (a pyenv shim may exist without being active), else the default python3.
find_python() {
  local candidate
  for candidate in "${OLD_STACK_PYTHON:-}" python3.10 "$HOME"/.pyenv/versions/3.10*/bin/python3.10 python3; do
    [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
      && { command -v "$candidate"; return; }
  done
  echo "old-stack: no Python 3.10 or newer found" >&2
  return 1
}
PY=$(find_python)
venv=${OLD_STACK_VENV:-.venv-old}
stamp=$venv/.requirements.sha256
want=$( (cat requirements-oldstack.txt requirements-oldstack-nodeps.txt; "$PY" --version) | sha256sum | cut -d' ' -f1)
start=$SECONDS
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x $venv/bin/python ]; }; then
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  # torch first and without its dependencies (see requirements-oldstack-nodeps.txt); then the pins, which pip
  # resolves against the torch already there instead of fetching another one. --no-compile: byte-compiling the
  # whole of torch, transformers and gradio costs minutes; the tests compile only what they import.
  $venv/bin/python -m pip install --quiet --no-compile --no-deps -r requirements-oldstack-nodeps.txt
  $venv/bin/python -m pip install --quiet --no-compile -r requirements-oldstack.txt
  echo "$want" > "$stamp"
fi
echo "old stack: $($venv/bin/python --version), torch $($venv/bin/python -c 'import torch; print(torch.__version__)')," \
     "venv ready after $((SECONDS - start)) s" >&2
# Engine, fake-WebUI glue, and the training run (the real trainer through the job manager and the CLI).
$venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_guidance.py tests/test_terms.py tests/test_syntax.py tests/test_params.py tests/test_tokenizer.py \
  tests/test_models.py tests/test_nulltext.py tests/test_denoiser.py tests/test_sampling.py tests/test_checkpoint.py \
  tests/test_concept_file.py tests/test_cli.py tests/test_fileio.py \
  tests/test_coefficients.py tests/test_parameterization.py tests/test_sdxl.py tests/test_sdxl_unet.py \
  tests/test_openclip.py \
  tests/test_webui_glue.py tests/test_forge_glue.py tests/test_route_access.py tests/test_training_tab.py \
  tests/test_jobs_api.py \
  tests/test_install.py tests/test_import_boundaries.py \
  tests/test_jobfolder.py tests/test_job_scheduler.py tests/test_job_publisher.py tests/test_job_supervisor.py \
  tests/test_stopping.py tests/test_trainer_config.py \
  tests/test_train_memory.py tests/test_buckets.py tests/test_checkpoint_slim.py tests/test_sdxl_concept.py \
  "tests/test_trainer_cli.py::test_cli_prepare_train_status_sample_resume" \
  "tests/test_jobs.py::test_real_trainer_start_progress_stop_resume_complete"
echo "old stack: done after $((SECONDS - start)) s" >&2
