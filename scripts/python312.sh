# Sourced by scripts/test.sh, scripts/quickstart.sh and .ci/run: find Python 3.12 and make a virtualenv with it.
# infir2 needs Python 3.12 (megatron-core 0.19.2's wheel and the dependency pins are built for it); an older pip
# would spend minutes resolving before failing, so the check comes first.

find_python312() {  # prints the path of a Python 3.12 interpreter, or explains what to install and fails
    local candidate root
    root=$(pyenv root 2>/dev/null || true)
    for candidate in ${INFIR2_PYTHON:-} $(ls -d "${root:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null) \
                     "$(command -v python3.12 || true)" "$(command -v python3 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "infir2 needs Python 3.12 and found none (tried \$INFIR2_PYTHON, pyenv's 3.12.*, python3.12, python3" \
         "$(python3 --version 2>/dev/null || true)): install it, e.g. \`pyenv install 3.12\` or your" \
         "distribution's python3.12 package" >&2
    return 1
}

venv_with() {  # VENV_DIR PIP_ARGS...: a venv with these packages; rebuilt when pyproject.toml or the pins change
    local venv=$1 key python
    shift
    key=$(cat pyproject.toml .ci/constraints.txt | sha256sum | cut -c1-16)
    if [ -f "$venv/.complete" ] && [ "$(cat "$venv/.complete")" = "$key $*" ]; then
        # an editable install of another clone may be there (a shared cache): point it at this one
        "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
        return 0
    fi
    python=$(find_python312) || return 1
    echo "creating $venv with $python: pip install $* (torch alone is a few GB: minutes)" >&2
    rm -rf "$venv" && mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$venv/bin/python" -m pip install -q "$@"
    echo "$key $*" > "$venv/.complete"
}
