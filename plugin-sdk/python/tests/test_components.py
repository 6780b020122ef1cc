"""The built Python components run by the real gateway (`watchgate plugin
test`): py-event-log writes the Rust event-log's bytes, and the host's
limits and the SDK's error path act on py-fault-by-key.

Needs the gateway binary ($WATCHGATE, default target/debug/watchgate) and
the components in $WATCHGATE_DIST (default dist/plugins), as scripts/test
leaves them. Without them the tests are skipped, unless
WATCHGATE_REQUIRE_COMPONENT_TESTS=1 (CI) makes that a failure. Each run
compiles a ~19 MB component (about 15-25 s).
"""

import json
import os
import subprocess
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("WATCHGATE", ROOT / "target" / "debug" / "watchgate"))
DIST = Path(os.environ.get("WATCHGATE_DIST", ROOT / "dist" / "plugins"))
REQUIRED = os.environ.get("WATCHGATE_REQUIRE_COMPONENT_TESTS") == "1"


def need(*paths):
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        if REQUIRED:
            raise AssertionError(f"missing for the component tests: {missing}")
        raise unittest.SkipTest(f"missing {missing}")


def plugin_test(wasm, events, *extra):
    """Run `watchgate plugin test`; its JSON lines and exit code."""
    result = subprocess.run(
        [str(BINARY), "plugin", "test", str(wasm), "--events", str(events), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(l) for l in result.stdout.split("\n") if l.startswith("{")]
    return lines, result.returncode, result.stderr


class EventLogParity(unittest.TestCase):
    def test_same_bytes_as_the_rust_event_log(self):
        rust, py = DIST / "event-log.wasm", DIST / "py-event-log.wasm"
        need(BINARY, rust, py)
        events = ROOT / "plugins" / "py-event-log" / "events.jsonl"
        written = {}
        with tempfile.TemporaryDirectory() as tmp:
            for wasm in (rust, py):
                out = Path(tmp) / wasm.stem
                out.mkdir()
                lines, code, err = plugin_test(wasm, events, "--files", str(out), "--perform")
                self.assertEqual(code, 0, err)
                outcomes = [l["outcome"] for l in lines if "outcome" in l]
                self.assertEqual(outcomes, ["ok"] * len(events.read_bytes().split(b"\n")[:-1]))
                written[wasm.stem] = (out / "events.jsonl").read_bytes()
        self.assertGreater(len(written["event-log"]), 0)
        self.assertEqual(written["py-event-log"], written["event-log"])

    def test_the_manifest_is_read_from_the_component(self):
        py = DIST / "py-event-log.wasm"
        need(BINARY, py)
        with tempfile.TemporaryDirectory() as tmp:
            events = Path(tmp) / "none.jsonl"
            events.write_text("")
            lines, code, err = plugin_test(py, events)
        self.assertEqual(code, 0, err)
        self.assertEqual(lines[0]["manifest"]["name"], "py-event-log")
        self.assertEqual(lines[0]["capabilities"]["requested"], ["files"])


class Faults(unittest.TestCase):
    def test_limits_and_errors_under_default_limits(self):
        wasm = DIST / "py-fault-by-key.wasm"
        need(BINARY, wasm)
        events = ROOT / "plugins" / "py-fault-by-key" / "events.jsonl"
        lines, code, err = plugin_test(wasm, events)
        self.assertEqual(code, 1, err)  # some calls failed, by design
        outcomes = [(l["key"], l["outcome"]) for l in lines if "outcome" in l]
        self.assertEqual(
            outcomes,
            [
                ("ok", "ok"),
                ("count", "ok"),
                ("spin", "out_of_fuel"),
                ("count", "ok"),
                ("alloc", "memory"),
                ("count", "ok"),
                ("error", "error"),
                ("recurse", outcomes[7][1]),
                ("ok", "ok"),
            ],
        )
        self.assertNotEqual(outcomes[7][1], "ok")
        error = next(l for l in lines if l.get("key") == "error")
        self.assertRegex(error["message"], r"^ValueError: asked to fail by key 'error' \(at .*app\.py:\d+ in handle\)$")
        # The counter lives in host state, so it survives the instances the
        # spin and alloc traps threw away.
        counts = [l["log"]["message"] for l in lines if l.get("log", {}).get("stream") == "log"]
        self.assertEqual(counts, ["count=1", "count=2", "count=3"])


if __name__ == "__main__":
    unittest.main()
