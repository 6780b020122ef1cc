#!/usr/bin/env python3
"""Build a Python watchgate plugin into a WebAssembly component.

Usage: build.py PLUGIN_DIR -o OUT.wasm [--componentize-py PATH]

PLUGIN_DIR holds ``app.py`` (the module componentize-py wraps; it assigns
``WitWorld = watchgate.export(...)``) and may hold other modules it
imports. ``app.py`` declares the plugin with a top-level string constant
``MANIFEST`` holding TOML, the same text a Rust plugin passes to
``manifest!``. This script reads that constant without running the plugin,
checks it against the manifest schema the gateway reads
(``gateway/src/manifest.rs``), runs componentize-py against
``plugin-sdk/wit`` (world ``plugin``), and appends the text as the
component's ``watchgate-manifest`` custom section.

Runs on the build machine's Python (3.11 or later, for ``tomllib``).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parent
WIT_DIR = SDK_DIR.parent / "wit"
WORLD = "plugin"
APP_MODULE = "app"
SECTION = "watchgate-manifest"
# The gateway rejects a larger section (gateway/src/manifest.rs MAX_SECTION).
MAX_SECTION = 64 * 1024
# "\0asm" and the component-model version/layer 0d 00 01 00.
COMPONENT_HEADER = b"\x00asm\x0d\x00\x01\x00"

MANIFEST_KEYS = {"name", "version", "description", "capabilities", "subscribe"}
CAPABILITIES = {"files", "http", "kv", "snapshot", "commands"}


class BuildError(Exception):
    pass


def read_manifest(app: Path) -> str | None:
    """The ``MANIFEST`` string constant of ``app``, checked; None if absent."""
    tree = ast.parse(app.read_text(encoding="utf-8"), filename=str(app))
    found = None
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if "MANIFEST" not in targets:
            continue
        if found is not None:
            raise BuildError(f"{app}:{node.lineno}: MANIFEST is assigned more than once")
        value = getattr(node, "value", None)
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            raise BuildError(
                f"{app}:{node.lineno}: MANIFEST must be a string literal (TOML text), "
                "so the build can read it without running the plugin"
            )
        found = value.value
    if found is None:
        return None
    check_manifest(found, app)
    return found


def check_manifest(text: str, origin: Path) -> None:
    """Refuse at build time what the gateway would refuse at load time."""
    size = len(text.encode("utf-8"))
    if size > MAX_SECTION:
        raise BuildError(f"{origin}: MANIFEST is {size} bytes, over the gateway's {MAX_SECTION}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"{origin}: MANIFEST is not TOML: {e}") from None
    unknown = sorted(set(data) - MANIFEST_KEYS)
    if unknown:
        raise BuildError(
            f"{origin}: MANIFEST has unknown keys {unknown} (known: {sorted(MANIFEST_KEYS)})"
        )
    for key in ("name", "version", "description"):
        if key in data and not isinstance(data[key], str):
            raise BuildError(f"{origin}: MANIFEST {key} must be a string")
    caps = data.get("capabilities", [])
    if not isinstance(caps, list) or any(c not in CAPABILITIES for c in caps):
        raise BuildError(
            f"{origin}: MANIFEST capabilities must be a list of {sorted(CAPABILITIES)}, got {caps!r}"
        )
    subs = data.get("subscribe", [])
    if not isinstance(subs, list):
        raise BuildError(f"{origin}: MANIFEST subscribe must be an array of tables")
    for s in subs:
        if not isinstance(s, dict) or not isinstance(s.get("source"), str):
            raise BuildError(f"{origin}: each [[subscribe]] needs source = \"NAME\"")
        if not isinstance(s.get("prefix", ""), str) or set(s) - {"source", "prefix"}:
            raise BuildError(f"{origin}: a [[subscribe]] has only source and prefix (strings)")


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def custom_section(name: str, data: bytes) -> bytes:
    """A custom section (id 0): LEB128 size, then the name as a vector, then data."""
    encoded = name.encode("utf-8")
    body = leb128(len(encoded)) + encoded + data
    return b"\x00" + leb128(len(body)) + body


def componentize(componentize_py: str, plugin_dir: Path, out: Path) -> None:
    cmd = [
        componentize_py,
        "-d", str(WIT_DIR),
        "-w", WORLD,
        "componentize",
        "-p", str(plugin_dir),
        "-p", str(SDK_DIR),
        APP_MODULE,
        "-o", str(out),
    ]
    # componentize-py would otherwise add the build venv's site-packages
    # (its own install) to the plugin's Python path.
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"componentize-py failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )


def build(plugin_dir: Path, out: Path, componentize_py: str) -> None:
    app = plugin_dir / f"{APP_MODULE}.py"
    if not app.is_file():
        raise BuildError(f"{plugin_dir} has no {APP_MODULE}.py")
    manifest = read_manifest(app)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wg-py-") as tmp:
        raw = Path(tmp) / "component.wasm"
        componentize(componentize_py, plugin_dir, raw)
        data = raw.read_bytes()
        if not data.startswith(COMPONENT_HEADER):
            raise BuildError(f"componentize-py wrote no component (header {data[:8].hex()})")
        if manifest is not None:
            data += custom_section(SECTION, manifest.encode("utf-8"))
        partial = out.with_name(out.name + ".partial")
        partial.write_bytes(data)
        partial.replace(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plugin_dir", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument(
        "--componentize-py",
        default=shutil.which("componentize-py") or "componentize-py",
        help="the componentize-py executable (default: from PATH)",
    )
    args = parser.parse_args(argv)
    try:
        build(args.plugin_dir.resolve(), args.output.resolve(), args.componentize_py)
    except (BuildError, OSError, SyntaxError) as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
