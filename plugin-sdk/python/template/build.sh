#!/usr/bin/env sh
# Build {{name}}.wasm with the watchgate repository's Python plugin build,
# which installs the pinned componentize-py into the repository's .tools/py
# on first use (Python 3.11 or later with venv needed).
set -eu
cd "$(dirname "$0")"
build="{{repo}}/scripts/build-python-plugins"
if [ ! -x "$build" ]; then
    echo "build.sh: $build is missing; this plugin was made from a watchgate repository that is no longer there (run 'watchgate plugin new --lang python --sdk PATH' again with the repository's plugin-sdk)" >&2
    exit 1
fi
exec "$build" --plugin . --output {{name}}.wasm
