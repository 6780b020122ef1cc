#!/usr/bin/env python3
"""Start a Python watchgate plugin from plugin-sdk/python/template.

Usage: new.py NAME [--dir DIR]

Writes DIR (default ./NAME) with app.py (a manifest and a handler),
build.sh (the one command that builds NAME.wasm, pointing at this SDK),
sidecar.example.toml, events.jsonl to test with, and .gitignore. The
template's files are format strings: {name} and {sdk} are filled in.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parent
TEMPLATE = SDK_DIR / "template"
# As the gateway names plugins after their file: letters, digits, - and _.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")


def render(name: str, target: Path) -> list[Path]:
    if not NAME.match(name):
        raise ValueError(f"{name!r} is not a plugin name (letters, digits, - and _)")
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sorted(TEMPLATE.iterdir()):
        dest = target / (".gitignore" if src.name == "gitignore" else src.name)
        dest.write_text(src.read_text().format(name=name, sdk=SDK_DIR.as_posix()))
        if src.name.endswith(".sh"):
            dest.chmod(0o755)
        written.append(dest)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args(argv)
    target = args.dir or Path(args.name)
    try:
        render(args.name, target)
    except (ValueError, OSError) as e:
        print(f"new.py: {e}", file=sys.stderr)
        return 1
    print(f"Created {target}. Build and try it:")
    print(f"  cd {target} && ./build.sh")
    print(f"  watchgate plugin test {args.name}.wasm --events events.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
