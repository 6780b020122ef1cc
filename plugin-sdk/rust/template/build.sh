#!/usr/bin/env sh
# Build {{name}}.wasm: the crate for wasm32-wasip2 (release profile), copied
# out of cargo's target directory.
set -eu
cd "$(dirname "$0")"
if ! command -v cargo >/dev/null 2>&1; then
    echo "build.sh: needs cargo: install Rust with rustup (https://rustup.rs), then run: rustup target add wasm32-wasip2" >&2
    exit 1
fi
# Installing a missing target is what scripts/build-plugins does too; without
# rustup, the toolchain must already carry the wasm32-wasip2 standard library.
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "build.sh: adding the wasm32-wasip2 target (rustup target add wasm32-wasip2)"
    rustup target add wasm32-wasip2
fi
cargo build --release --target wasm32-wasip2
# CARGO_TARGET_DIR or a cargo config may move the target directory.
target_dir="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
cp "${target_dir:-target}/wasm32-wasip2/release/{{crate}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
