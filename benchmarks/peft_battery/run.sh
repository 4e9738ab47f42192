#!/usr/bin/env bash
# peft's custom-model test battery with FISH-DIP cases beside SHiRA's (see README.md beside this file).
# Usage: benchmarks/peft_battery/run.sh [--keep-identity-start] [--cache DIR] [--out DIR] [-k EXPR] [-- PYTEST_ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m benchmarks.peft_battery "$@"
