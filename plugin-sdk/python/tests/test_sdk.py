"""Tests of the Python SDK against the bindings componentize-py generates
for plugin-sdk/wit, with the host imports replaced by recording fakes.

Run: scripts/build-python-plugins --test (or, with componentize-py on PATH,
python3 -m unittest discover -s plugin-sdk/python/tests).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

SDK = Path(__file__).resolve().parents[1]
ROOT = SDK.parents[1]
BINDINGS = tempfile.mkdtemp(prefix="wg-py-bindings-")


def setUpModule():
    componentize_py = os.environ.get("COMPONENTIZE_PY") or shutil.which("componentize-py")
    if componentize_py is None:
        raise unittest.SkipTest("componentize-py not found (set COMPONENTIZE_PY)")
    subprocess.run(
        [componentize_py, "-d", str(SDK.parent / "wit"), "-w", "plugin", "bindings", BINDINGS],
        check=True,
        capture_output=True,
    )
    sys.path[:0] = [BINDINGS, str(SDK), str(ROOT / "plugins" / "py-event-log")]


def tearDownModule():
    shutil.rmtree(BINDINGS, ignore_errors=True)


class Host:
    """Fakes for every host import; `calls` records them in order."""

    def __init__(self):
        from componentize_py_types import Err
        from wit_world.imports import commands, files, http, kv, log, settings, snapshot, state

        self.calls = []
        self.files = {}
        self.run_result = None
        self.refuse = None  # a message: every fallible call fails with it
        self.state = {}
        self.settings = {}

        def fallible(name, result=None):
            def call(*args):
                self.calls.append((name, *args))
                if self.refuse is not None:
                    raise Err(self.refuse)
                return result(*args) if result else None

            return call

        def state_set(key, value):
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value

        self.patches = {
            (log, "log"): lambda level, msg: self.calls.append(("log", level.name, msg)),
            (state, "get"): lambda key: self.state.get(key),
            (state, "set"): fallible("state.set", state_set),
            (settings, "get"): lambda name: self.settings.get(name),
            (files, "append"): fallible("files.append"),
            (files, "replace"): fallible("files.replace"),
            (files, "read"): fallible("files.read", lambda p: self.files.get(p)),
            (files, "rename"): fallible("files.rename"),
            (files, "remove"): fallible("files.remove"),
            (commands, "run"): fallible("commands.run", lambda n, f: self.run_result),
            (commands, "trigger"): fallible("commands.trigger"),
            (commands, "signal"): fallible("commands.signal"),
            (http, "send"): fallible("http.send", lambda req: 7),
            (kv, "put"): fallible("kv.put"),
            (kv, "delete"): fallible("kv.delete"),
            (snapshot, "get"): fallible("snapshot.get", lambda s, k: b"v"),
            (snapshot, "scan"): fallible("snapshot.scan", lambda s, p: [("a", b"1")]),
        }
        self.saved = {}

    def __enter__(self):
        for (module, name), fake in self.patches.items():
            self.saved[(module, name)] = getattr(module, name)
            setattr(module, name, fake)
        return self

    def __exit__(self, *exc):
        for (module, name), orig in self.saved.items():
            setattr(module, name, orig)


def wit_event(kind="PUT", key="app/port", value=b"8080", **extra):
    from wit_world.imports import types

    fields = dict(
        source="etcd",
        kind=getattr(types.EventKind, kind),
        key=key,
        value=value,
        prev_value=None,
        revision=7,
        resync=False,
        coalesced=0,
        metadata=[],
    )
    fields.update(extra)
    return types.Event(**fields)


class EventTest(unittest.TestCase):
    def test_every_field_is_carried_over(self):
        import watchgate

        e = watchgate.Event._from_wit(
            wit_event(
                "DELETE",
                value=None,
                prev_value=b"\xff",
                revision=2**64 - 1,
                resync=True,
                coalesced=3,
                metadata=[("md5", "x"), ("md5", "y")],
            )
        )
        self.assertIs(e.kind, watchgate.EventKind.DELETE)
        self.assertEqual(e.kind, "delete")
        self.assertTrue(e.is_delete)
        self.assertFalse(e.is_put)
        self.assertEqual((e.source, e.key, e.value), ("etcd", "app/port", None))
        self.assertEqual(e.prev_value, b"\xff")
        self.assertIsNone(e.prev_text())
        self.assertEqual((e.revision, e.resync, e.coalesced), (2**64 - 1, True, 3))
        self.assertEqual(e.meta("md5"), "x")
        self.assertIsNone(e.meta("etag"))

    def test_text_is_none_for_invalid_utf8(self):
        import watchgate

        self.assertEqual(watchgate.Event._from_wit(wit_event(value="é".encode())).text(), "é")
        self.assertIsNone(watchgate.Event._from_wit(wit_event(value=b"\xed\xa0\x80")).text())


class ExportTest(unittest.TestCase):
    def world(self, handle, batch=None):
        import watchgate

        attrs = {"handle": handle}
        if batch:
            attrs["handle_batch"] = batch
        return watchgate.export(type("P", (watchgate.Plugin,), attrs))()

    def test_success_returns_none_and_sees_the_event(self):
        seen = []
        world = self.world(lambda self, e: seen.append((e.kind, e.text())))
        self.assertIsNone(world.handle(wit_event()))
        self.assertEqual(seen, [("put", "8080")])

    def test_an_exception_becomes_the_error_string_with_its_place(self):
        from componentize_py_types import Err

        def handle(self, e):
            raise ValueError("bad port")

        with self.assertRaises(Err) as cm:
            self.world(handle).handle(wit_event())
        self.assertRegex(cm.exception.value, r"^ValueError: bad port \(at .*test_sdk\.py:\d+ in handle\)$")

    def test_a_plugin_error_is_the_message_alone(self):
        import watchgate
        from componentize_py_types import Err

        def handle(self, e):
            raise watchgate.PluginError("invalid JSON at line 3")

        with self.assertRaises(Err) as cm:
            self.world(handle).handle(wit_event())
        self.assertEqual(cm.exception.value, "invalid JSON at line 3")

    def test_memory_error_is_not_turned_into_an_error(self):
        def handle(self, e):
            raise MemoryError()

        with self.assertRaises(MemoryError):
            self.world(handle).handle(wit_event())

    def test_default_batch_stops_at_the_first_failure(self):
        from componentize_py_types import Err

        seen = []

        def handle(self, e):
            if e.key == "bad":
                raise KeyError("bad")
            seen.append(e.key)

        events = [wit_event(key="a"), wit_event(key="b"), wit_event(key="bad"), wit_event(key="c")]
        with self.assertRaises(Err) as cm:
            self.world(handle).handle_batch(events)
        self.assertEqual(seen, ["a", "b"])
        self.assertEqual(cm.exception.value.index, 2)
        self.assertTrue(cm.exception.value.message.startswith("KeyError: 'bad'"))
        self.assertIsNone(self.world(handle).handle_batch(events[:2]))

    def test_a_batch_failing_outside_any_event_names_no_event(self):
        from componentize_py_types import Err

        def batch(self, events):
            raise RuntimeError("setup failed")

        with self.assertRaises(Err) as cm:
            self.world(lambda s, e: None, batch).handle_batch([wit_event(), wit_event()])
        self.assertEqual(cm.exception.value.index, 2)

    def test_the_plugin_object_lives_as_long_as_the_instance(self):
        import watchgate

        class Counter(watchgate.Plugin):
            made = 0

            def __init__(self):
                Counter.made += 1
                self.n = 0

            def handle(self, e):
                self.n += 1

        World = watchgate.export(Counter)
        World().handle(wit_event())
        World().handle(wit_event())
        self.assertEqual(Counter.made, 1)

    def test_export_refuses_what_is_not_a_plugin(self):
        import watchgate

        with self.assertRaises(TypeError):
            watchgate.export(object)


class CapabilityTest(unittest.TestCase):
    def test_calls_reach_the_host_with_bytes(self):
        import watchgate
        from watchgate import files, http, kv, log, settings, snapshot, state

        with Host() as host:
            host.settings["url"] = "https://h/x"
            log.warn("w")
            files.append("a.txt", "é")
            files.replace("b.bin", b"\x00")
            state.set("k", "v")
            self.assertEqual(state.get("k"), b"v")
            self.assertEqual(state.get_text("k"), "v")
            state.delete("k")
            self.assertIsNone(state.get("k"))
            self.assertEqual(settings.get("url"), "https://h/x")
            self.assertEqual(settings.get("nope", "d"), "d")
            with self.assertRaisesRegex(watchgate.PluginError, "'nope'"):
                settings.require("nope")
            self.assertEqual(http.post_json(settings.require("url"), {"a": "é"}), 7)
            kv.put("main", "/k", "1")
            kv.delete("main", "/k")
            self.assertEqual(snapshot.get("main", "/k"), b"v")
            self.assertEqual(snapshot.scan("main", "/"), [("a", b"1")])
        calls = host.calls
        self.assertEqual(calls[0], ("log", "WARN", "w"))
        self.assertEqual(calls[1], ("files.append", "a.txt", "é".encode()))
        self.assertEqual(calls[2], ("files.replace", "b.bin", b"\x00"))
        self.assertEqual(calls[3], ("state.set", "k", b"v"))
        self.assertEqual(calls[4], ("state.set", "k", None))
        req = calls[5][1]
        self.assertEqual((req.method, req.url), ("POST", "https://h/x"))
        self.assertEqual(req.headers, [("content-type", "application/json")])
        self.assertEqual(req.body, '{"a":"é"}'.encode())
        self.assertEqual(calls[6], ("kv.put", "main", "/k", b"1"))

    def test_render_check_and_reload_reach_the_host(self):
        import watchgate
        from watchgate import commands, files

        def result(code, timed_out=False, stderr=""):
            return commands.RunResult(
                exit_code=code,
                timed_out=timed_out,
                stdout_tail="",
                stderr_tail=stderr,
                duration_ms=3,
            )

        with Host() as host:
            host.files["nginx.conf"] = "old".encode()
            self.assertEqual(files.read("nginx.conf"), b"old")
            self.assertEqual(files.read_text("nginx.conf"), "old")
            self.assertIsNone(files.read("missing"))
            files.replace("nginx.conf.new", "new")
            host.run_result = result(0)
            self.assertEqual(commands.check("check", "nginx.conf.new").duration_ms, 3)
            files.rename("nginx.conf.new", "nginx.conf")
            commands.trigger("reload")
            commands.signal("nginx")
            files.remove("stale.conf")
            # A failing check is a result from run, and an error from check
            # that names the command and ends with its stderr.
            host.run_result = result(1, stderr="emerg: unknown directive\n")
            self.assertEqual(commands.run("check").exit_code, 1)
            with self.assertRaises(watchgate.HostError) as cm:
                commands.check("check", "x")
            self.assertEqual(str(cm.exception), "command 'check' exited 1: emerg: unknown directive")
            host.run_result = result(None, timed_out=True)
            with self.assertRaisesRegex(watchgate.HostError, "^command 'check' timed out$"):
                commands.check("check")
        self.assertEqual(
            host.calls[:8],
            [
                ("files.read", "nginx.conf"),
                ("files.read", "nginx.conf"),
                ("files.read", "missing"),
                ("files.replace", "nginx.conf.new", b"new"),
                ("commands.run", "check", "nginx.conf.new"),
                ("files.rename", "nginx.conf.new", "nginx.conf"),
                ("commands.trigger", "reload", None),
                ("commands.signal", "nginx"),
            ],
        )
        self.assertEqual(host.calls[8], ("files.remove", "stale.conf"))

    def test_a_refusal_is_a_host_error_with_the_hosts_message(self):
        import watchgate
        from watchgate import commands, files, kv, snapshot

        with Host() as host:
            host.refuse = "files: not granted"
            for call in (
                lambda: files.append("a", b""),
                lambda: kv.delete("s", "k"),
                lambda: snapshot.scan("s", ""),
                lambda: files.read("a"),
                lambda: commands.run("c"),
                lambda: commands.signal("c"),
            ):
                with self.assertRaises(watchgate.HostError) as cm:
                    call()
                self.assertEqual(str(cm.exception), "files: not granted")

    def test_a_host_refusal_fails_the_event_with_the_message(self):
        import watchgate
        from componentize_py_types import Err
        from watchgate import files

        class P(watchgate.Plugin):
            def handle(self, e):
                files.append("x", b"1")

        with Host() as host:
            host.refuse = "quota"
            with self.assertRaises(Err) as cm:
                watchgate.export(P)().handle(wit_event())
        self.assertEqual(cm.exception.value, "quota")


class EventLogTest(unittest.TestCase):
    """plugins/py-event-log: the lines the Rust event-log's unit tests expect."""

    def line(self, **fields):
        import app
        import watchgate

        return app.json_line(watchgate.Event._from_wit(wit_event(**fields)))

    def test_put_with_text_value(self):
        self.assertEqual(
            self.line(),
            '{"source":"etcd","kind":"put","key":"app/port","value":"8080",'
            '"revision":7,"resync":false,"coalesced":0}\n',
        )

    def test_binary_value_uses_base64(self):
        line = self.line(value=b"\xff\x00\x41")
        self.assertIn('"value_b64":"/wBB"', line)
        self.assertNotIn('"value"', line)

    def test_delete_has_no_value(self):
        self.assertEqual(
            self.line(kind="DELETE", value=None, resync=True, coalesced=3),
            '{"source":"etcd","kind":"delete","key":"app/port",'
            '"revision":7,"resync":true,"coalesced":3}\n',
        )

    def test_fencing_token_as_rust_parses_u64(self):
        cases = {"42": 42, "+7": 7, "007": 7, str(2**64 - 1): 2**64 - 1,
                 str(2**64): None, " 5": None, "1_0": None, "": None, "+": None,
                 "-1": None, "\u0663": None}
        for text, want in cases.items():
            line = self.line(metadata=[("fencing_token", text)])
            if want is None:
                self.assertNotIn("fencing_token", line, text)
            else:
                self.assertTrue(line.endswith(f'"coalesced":0,"fencing_token":{want}}}\n'), line)


class BuildTest(unittest.TestCase):
    def setUp(self):
        sys.path.insert(0, str(SDK))
        self.build = importlib.import_module("build")
        self.dir = Path(tempfile.mkdtemp())

    def tearDown(self):
        shutil.rmtree(self.dir)

    def manifest(self, source):
        app = self.dir / "app.py"
        app.write_text(source)
        return self.build.read_manifest(app)

    def test_reads_the_constant_without_running_the_module(self):
        text = self.manifest('import nothing_here\nMANIFEST = """\nname = "x"\ncapabilities = ["kv"]\n"""\n')
        self.assertIn('name = "x"', text)
        self.assertIsNone(self.manifest("x = 1\n"))

    def test_refuses_what_the_gateway_would(self):
        for bad in (
            'MANIFEST = f"name = {1}"',
            'MANIFEST = "capabilities = [\\"root\\"]"',
            'MANIFEST = "colour = \\"red\\""',
            'MANIFEST = "[[subscribe]]\\nprefix = \\"/a\\""',
            'MANIFEST = "name = \\"a\\""\nMANIFEST = "name = \\"b\\""',
            'MANIFEST = "name = "',
        ):
            with self.assertRaises(self.build.BuildError, msg=bad):
                self.manifest(bad + "\n")

    def test_custom_section_encoding(self):
        self.assertEqual(self.build.leb128(0), b"\x00")
        self.assertEqual(self.build.leb128(300), b"\xac\x02")
        data = b"d" * 200
        section = self.build.custom_section("watchgate-manifest", data)
        # id 0, size 219 as LEB128, name length 18, name, data.
        self.assertEqual(section[:3], b"\x00\xdb\x01")
        self.assertEqual(section[3], 18)
        self.assertEqual(section[4:22], b"watchgate-manifest")
        self.assertEqual(section[22:], data)


if __name__ == "__main__":
    unittest.main()
