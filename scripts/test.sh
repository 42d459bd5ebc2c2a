#!/usr/bin/env bash
# Set up (a Python 3.12 venv with the test extras and CI's torch pin) and run the test suite on the CPU, as CI does.
#   scripts/test.sh            the whole suite (no GPU needed)
#   scripts/test.sh --fast     only tests/unit (in-process, a minute or two)
#   scripts/test.sh ARGS...    anything else goes to pytest
# The venv is $INFIR2_TEST_VENV, default .venv-test (reused while pyproject.toml and .ci/constraints.txt are unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python312.sh
VENV=${INFIR2_TEST_VENV:-.venv-test}
venv_with "$VENV" -c .ci/constraints.txt -e '.[test]'
export PATH="$VENV/bin:$PATH"
if [ "${1:-}" = "--fast" ]; then
    shift
    set -- tests/unit "$@"
fi
exec python -m pytest -q -m "not gpu" "$@"
