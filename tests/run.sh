#!/usr/bin/env bash
# The one test command: Python peers in a venv, then fmt, clippy, every cargo test target and
# the doc examples.
#
#   tests/run.sh            # from anywhere inside the repository
#
# The venv lives in target/pyenv and is rebuilt only when tests/requirements.txt changes
# (keyed on its sha256), so reruns start in about a second. The tests find its interpreter
# through ONNXOPT_PYTHON, which this script exports.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

venv="$root/target/pyenv"
req="$root/tests/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    step "python venv $venv is up to date with tests/requirements.txt ($want)"
else
    step "creating python venv $venv from tests/requirements.txt"
    mkdir -p "$root/target"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$req"
    echo "$want" > "$stamp"
fi
export ONNXOPT_PYTHON="$venv/bin/python"
"$ONNXOPT_PYTHON" -c 'import onnx, onnxruntime, numpy; print("onnx", onnx.__version__, "| onnxruntime", onnxruntime.__version__, "| numpy", numpy.__version__)'
echo "ONNXOPT_PYTHON=$ONNXOPT_PYTHON"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test (all targets, debug)"
cargo test --all-targets --no-fail-fast

step "cargo test --doc (the library's examples compile)"
cargo test --doc

step "all checks passed"
