#!/usr/bin/env sh
# Build {{name}}.wasm with the watchgate repository's Go plugin build: go
# (1.26 or later, from PATH, /usr/local/go/bin/go or $GO) makes a wasip1
# reactor, and the pinned wasm-tools (installed into the repository's
# .tools/venv on first use) makes it a component with the SDK's adapter.
set -eu
cd "$(dirname "$0")"
build="{{repo}}/scripts/build-go-plugins"
if [ ! -x "$build" ]; then
    echo "build.sh: $build is missing; this plugin was made from a watchgate repository that is no longer there (run 'watchgate plugin new --lang go --sdk PATH' again with the repository's plugin-sdk)" >&2
    exit 1
fi
exec "$build" --plugin . --output {{name}}.wasm
