// End-to-end checks of the JavaScript SDK: the real gateway binary runs the
// real compiled plugins under `watchgate plugin test`.
//
//   node --test plugin-sdk/js/test/
//
// WATCHGATE names the gateway (default target/debug/watchgate) and
// WATCHGATE_PLUGINS the built plugins (default dist/plugins, as
// scripts/build-plugins writes them).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, writeFile, mkdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { appendCustomSection, manifestToml } from '../build.mjs';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const gateway = process.env.WATCHGATE ?? join(root, 'target', 'debug', 'watchgate');
const plugins = process.env.WATCHGATE_PLUGINS ?? join(root, 'dist', 'plugins');

// An uncached compile of a componentize-js component takes 20-60 s on a
// busy 2-core machine, near the default compile_timeout of 60 s; the tests
// are about behaviour, so they allow more.
async function config() {
  const dir = await mkdtemp(join(tmpdir(), 'watchgate-js-test-'));
  await mkdir(join(dir, 'plugins.d'));
  await mkdir(join(dir, 'watched'));
  const file = join(dir, 'watchgate.toml');
  await writeFile(
    file,
    '[plugins]\ndir = "plugins.d"\n[state]\ndir = "data"\n[runtime]\ncompile_timeout = "300s"\n' +
      '[[source]]\nname = "local"\nkind = "file"\npath = "watched"\n',
  );
  return { dir, file };
}

/** Runs `watchgate plugin test` and returns its JSON lines and exit code. */
function pluginTest(wasm, events, args = []) {
  return new Promise((resolvePromise, reject) => {
    execFile(
      gateway,
      ['plugin', 'test', wasm, '--events', events, ...args],
      { maxBuffer: 64 << 20 },
      (err, stdout, stderr) => {
        if (err && typeof err.code !== 'number') return reject(err);
        const lines = stdout.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l));
        resolvePromise({ code: err ? err.code : 0, lines, stderr });
      },
    );
  });
}

const prerequisites = [gateway, ...['event-log', 'js-event-log', 'js-fault-by-key', 'js-chat-notify'].map((n) => join(plugins, `${n}.wasm`))];
const missing = prerequisites.filter((p) => !existsSync(p));
// Missing inputs fail rather than skip, so a CI run cannot pass by testing
// nothing.
const skip = false;
test('the gateway and the built plugins are there', () => {
  assert.deepEqual(missing, [], 'run scripts/build-plugins and build the gateway (or set WATCHGATE, WATCHGATE_PLUGINS)');
});

test('js-event-log appends exactly the lines the Rust event-log appends', { skip, timeout: 600_000 }, async () => {
  const { dir, file } = await config();
  const events = join(root, 'plugins', 'js-event-log', 'events.jsonl');
  const args = ['--config', file, '--files', join(dir, 'out')];
  const [rust, js] = await Promise.all([
    pluginTest(join(plugins, 'event-log.wasm'), events, args),
    pluginTest(join(plugins, 'js-event-log.wasm'), events, args),
  ]);
  assert.equal(rust.code, 0, rust.stderr);
  assert.equal(js.code, 0, js.stderr);
  const appends = (run) => run.lines.filter((l) => l.effect === 'files').map((l) => [l.detail.op, l.detail.path, l.detail.data]);
  const expected = appends(rust);
  const eventCount = (await import('node:fs')).readFileSync(events, 'utf8').trim().split('\n').length;
  assert.equal(expected.length, eventCount, 'event-log appends one line per event');
  assert.deepEqual(appends(js), expected);
  // The cases the file exists for are present in what was compared.
  const data = expected.map(([, , d]) => d).join('');
  for (const needle of ['"value_b64":', '"fencing_token":18446744073709551615', '"kind":"delete"', '"revision":18446744073709551615']) {
    assert.ok(data.includes(needle), `the events cover ${needle}`);
  }
  const header = js.lines[0];
  assert.equal(header.manifest.name, 'js-event-log');
  assert.deepEqual(header.manifest.capabilities, ['files']);
});

test('js-fault-by-key: errors, a loop, memory and state under the default limits', { skip, timeout: 600_000 }, async () => {
  const { file } = await config();
  const events = join(root, 'plugins', 'js-fault-by-key', 'events.jsonl');
  // Fuel high enough that the loop meets the deadline first.
  const run = await pluginTest(join(plugins, 'js-fault-by-key.wasm'), events, ['--config', file, '--fuel', '1000000000000']);
  assert.equal(run.code, 1, 'some calls fail');
  const header = run.lines[0];
  assert.equal(header.limits.memory_mb, 64);
  assert.equal(header.limits.timeout_ms, 1000);
  const outcomes = run.lines.filter((l) => 'outcome' in l);
  assert.deepEqual(
    outcomes.map((o) => [o.key, o.outcome]),
    [
      ['count', 'ok'],
      ['error', 'error'],
      ['type-error', 'error'],
      ['async', 'error'],
      ['spin', 'timeout'],
      ['count', 'ok'],
      ['alloc', 'memory'],
      ['count', 'ok'],
      ['append', 'error'],
      ['ok', 'ok'],
    ],
  );
  assert.equal(outcomes[1].message, 'boom');
  assert.match(outcomes[2].message, /^TypeError: /);
  assert.match(outcomes[3].message, /Promise/);
  assert.match(outcomes[8].message, /not granted/);
  // The counter lives in host state, so it keeps counting across the
  // instances the timeout and the memory trap replaced.
  const counts = run.lines.filter((l) => l.log && /^count=/.test(l.log.message)).map((l) => l.log.message);
  assert.deepEqual(counts, ['count=1', 'count=2', 'count=3']);
});

test('js-chat-notify posts one formatted message per change', { skip, timeout: 600_000 }, async () => {
  const { file } = await config();
  const dir = join(root, 'plugins', 'js-chat-notify');
  const run = await pluginTest(join(plugins, 'js-chat-notify.wasm'), join(dir, 'events.jsonl'), [
    '--config',
    file,
    '--sidecar',
    join(dir, 'sidecar.example.toml'),
  ]);
  assert.equal(run.code, 0, run.stderr);
  const requests = run.lines.filter((l) => l.effect === 'http').map((l) => l.detail);
  assert.deepEqual(
    requests.map((r) => [r.method, r.url, JSON.parse(r.body).text]),
    [
      ['POST', 'http://127.0.0.1:9/hooks/config', 'put app/port: 80 -> 8080 @7'],
      // Cut at 8 characters, not bytes.
      ['POST', 'http://127.0.0.1:9/hooks/config', 'put app/motd: - -> ünïcödé … @8'],
      ['POST', 'http://127.0.0.1:9/hooks/config', 'put app/blob: - -> <3 bytes> @9'],
      ['POST', 'http://127.0.0.1:9/hooks/config', 'delete app/port: - -> - @10'],
      // A placeholder inside a value is not expanded again.
      ['POST', 'http://127.0.0.1:9/hooks/config', 'put app/x: - -> {key} @11'],
    ],
  );
  assert.deepEqual(requests[0].headers, [['content-type', 'application/json']]);
});

test('the manifest becomes a top-level watchgate-manifest custom section', () => {
  const toml = manifestToml({
    name: '@acme/hook',
    version: '1.2.3',
    description: 'say "hi"',
    watchgate: { capabilities: ['http'], subscribe: [{ source: 'main', prefix: '/a/' }] },
  });
  assert.equal(
    toml,
    'name = "hook"\nversion = "1.2.3"\ndescription = "say \\"hi\\""\ncapabilities = ["http"]\n\n[[subscribe]]\nsource = "main"\nprefix = "/a/"\n',
  );
  const header = Buffer.from('0061736d0d000100', 'hex');
  const out = appendCustomSection(header, 'watchgate-manifest', Buffer.from('x'.repeat(200)));
  // id 0, size 1 + 18 + 200 = 219 as two LEB128 bytes, name length 18.
  assert.deepEqual([...out.subarray(8, 12)], [0x00, 0xdb, 0x01, 18]);
  assert.equal(out.subarray(12, 30).toString(), 'watchgate-manifest');
  assert.equal(out.length, 8 + 3 + 1 + 18 + 200);
});
