#!/usr/bin/env sh
# Build {name}.wasm: installs the pinned componentize-py into .venv on first
# use (or takes $COMPONENTIZE_PY), then runs the watchgate Python SDK's build.
set -eu
cd "$(dirname "$0")"
sdk="{sdk}"
if [ -z "${{COMPONENTIZE_PY:-}}" ]; then
    if [ ! -x .venv/bin/componentize-py ]; then
        python3 -m venv .venv
        .venv/bin/pip install --quiet -r "$sdk/requirements.txt"
    fi
    COMPONENTIZE_PY=.venv/bin/componentize-py
fi
python3 "$sdk/build.py" . -o {name}.wasm --componentize-py "$COMPONENTIZE_PY"
echo "built {name}.wasm"
