#!/usr/bin/env bash
# Set up (a Python 3.12 venv with the test extras and CI's torch pin) and run the test suite on the CPU, as CI does.
#   scripts/test.sh            the whole suite (no GPU needed)
#   scripts/test.sh --fast     only tests/unit (in-process, about a minute)
#   scripts/test.sh ARGS...    anything else goes to pytest
# Tests run in $INFIR2_TEST_WORKERS pytest workers (default 2, CI's cores; a file's tests stay on one worker
# because they share module fixtures); INFIR2_TEST_WORKERS=0 runs them in this process.
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
WORKERS=${INFIR2_TEST_WORKERS:-2}
PARALLEL=()
if [ "$WORKERS" != 0 ]; then
    PARALLEL=(-n "$WORKERS" --dist loadfile)
fi
exec python -m pytest -q -m "not gpu" "${PARALLEL[@]}" "$@"
