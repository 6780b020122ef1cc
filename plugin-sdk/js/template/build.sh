#!/usr/bin/env sh
# Build {{name}}.wasm with the watchgate repository's JavaScript plugin build
# (plugin-sdk/js/build.mjs), which installs the SDK's pinned tools into
# plugin-sdk/js/node_modules with npm ci on first use (node 20 or later and
# npm needed).
set -eu
cd "$(dirname "$0")"
build="{{repo}}/scripts/build-js-plugins"
if [ ! -x "$build" ]; then
    echo "build.sh: $build is missing; this plugin was made from a watchgate repository that is no longer there (run 'watchgate plugin new --lang js --sdk PATH' again with the repository's plugin-sdk)" >&2
    exit 1
fi
exec "$build" --plugin . --output {{name}}.wasm
