// Unit tests of the SDK and the example plugins' logic in plain node, with
// the host interfaces faked (host-hooks.mjs). The same code runs compiled
// in plugins.test.mjs.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { register } from 'node:module';

register('./host-hooks.mjs', import.meta.url);

const calls = [];
const stateStore = new Map();
const enc = (s) => new TextEncoder().encode(s);
let runResult;
globalThis.__watchgateHost = {
  log: { log: (level, message) => calls.push(['log', level, message]) },
  state: {
    get: (k) => stateStore.get(k),
    set: (k, v) => {
      if (k === 'full') throw { payload: 'state quota of 1 bytes would be exceeded' };
      if (v === undefined) stateStore.delete(k);
      else stateStore.set(k, v);
    },
  },
  settings: { get: (name) => ({ url: 'http://h:1/x' })[name] },
  files: {
    append: (path, data) => calls.push(['append', path, new TextDecoder().decode(data)]),
    replace: () => {
      throw { payload: 'capability `files` is not granted to this plugin' };
    },
    read: (path) => (calls.push(['read', path]), path === 'nginx.conf' ? enc('old') : undefined),
    rename: (from, to) => calls.push(['rename', from, to]),
    remove: (path) => calls.push(['remove', path]),
  },
  commands: {
    run: (name, file) => {
      calls.push(['run', name, file]);
      if (name === 'missing') throw { payload: 'command `missing` is not granted; granted: check' };
      return runResult;
    },
    trigger: (name, file) => calls.push(['trigger', name, file]),
    signal: (name) => calls.push(['signal', name]),
  },
  http: { send: (req) => (calls.push(['send', req]), 7n) },
  kv: { put: () => {}, delete: (s, k) => calls.push(['kv.delete', s, k]) },
  snapshot: { get: () => new Uint8Array([1]), scan: () => [['a', new Uint8Array([2])]] },
};

const sdk = await import('../src/index.js');
const { jsonLine, base64 } = await import('../../../plugins/js-event-log/src/index.js');
const { message } = await import('../../../plugins/js-chat-notify/src/index.js');

function raw(overrides = {}) {
  return {
    source: 'etcd',
    kind: 'put',
    key: 'app/port',
    value: enc('8080'),
    prevValue: undefined,
    revision: 7n,
    resync: false,
    coalesced: 0,
    metadata: [],
    ...overrides,
  };
}

test('Event: text, metadata and kind helpers', () => {
  const e = new sdk.Event(raw({ value: new Uint8Array([0xff]), prevValue: enc('ü'), metadata: [['a', '1'], ['a', '2']] }));
  assert.equal(e.valueText(), undefined, 'invalid UTF-8 has no text');
  assert.equal(e.prevValueText(), 'ü');
  assert.equal(e.meta('a'), '1');
  assert.equal(e.meta('b'), undefined);
  assert.equal(e.isPut, true);
  assert.equal(new sdk.Event(raw({ kind: 'delete', value: undefined })).isDelete, true);
});

test('exportsFor: thrown values become the error string, never a thrown Error', () => {
  class P extends sdk.Plugin {
    handle(e) {
      if (e.key === 'err') throw new Error('boom');
      if (e.key === 'type') throw new TypeError('bad type');
      if (e.key === 'str') throw 'plain';
      if (e.key === 'async') return Promise.resolve();
    }
  }
  const x = sdk.exportsFor(P);
  assert.deepEqual(x.handle(raw()), { tag: 'ok', val: undefined });
  assert.deepEqual(x.handle(raw({ key: 'err' })), { tag: 'err', val: 'boom' });
  assert.deepEqual(x.handle(raw({ key: 'type' })), { tag: 'err', val: 'TypeError: bad type' });
  assert.deepEqual(x.handle(raw({ key: 'str' })), { tag: 'err', val: 'plain' });
  assert.match(x.handle(raw({ key: 'async' })).val, /Promise/);
  assert.deepEqual(x.handleBatch([raw(), raw(), raw({ key: 'err' }), raw()]), {
    tag: 'err',
    val: { index: 2, message: 'boom' },
  });
  assert.deepEqual(x.handleBatch([raw(), raw()]), { tag: 'ok', val: undefined });
  assert.throws(() => sdk.exportsFor({}), /default-export/);
});

test('exportsFor: an out-of-memory traps instead of returning an error', () => {
  const x = sdk.exportsFor({
    handle() {
      throw 'out of memory';
    },
  });
  const r = x.handle(raw());
  assert.equal(r.tag, 'err');
  assert.equal(typeof r.val, 'symbol', 'a payload componentize-js cannot lower, so the call traps');
  assert.equal(typeof x.handleBatch([raw()]).val, 'symbol');
});

test('capabilities: bytes in, host errors out as CapabilityError', () => {
  calls.length = 0;
  sdk.files.append('a.txt', 'ü');
  assert.deepEqual(calls, [['append', 'a.txt', 'ü']]);
  assert.throws(
    () => sdk.files.replace('a.txt', 'x'),
    (e) => e instanceof sdk.CapabilityError && e.capability === 'files' && /not granted/.test(e.message),
  );
  sdk.state.set('n', '3');
  assert.equal(sdk.state.getText('n'), '3');
  sdk.state.set('n', null);
  assert.equal(sdk.state.get('n'), undefined);
  assert.throws(() => sdk.state.set('full', 'x'), /quota/);
  assert.throws(() => sdk.files.append('a', 5), TypeError);
  const id = sdk.http.postJson('http://h:1/x', { a: 1 });
  assert.equal(id, 7n);
  const req = calls.at(-1)[1];
  assert.deepEqual([req.method, req.url, req.headers, new TextDecoder().decode(req.body)], [
    'POST',
    'http://h:1/x',
    [['content-type', 'application/json']],
    '{"a":1}',
  ]);
  sdk.kv.delete('main', '/k');
  assert.deepEqual(calls.at(-1), ['kv.delete', 'main', '/k']);
  assert.deepEqual(sdk.snapshot.scan('main', ''), [['a', new Uint8Array([2])]]);
  sdk.log.warn('w');
  assert.deepEqual(calls.at(-1), ['log', 'warn', 'w']);
});

test('render, check and reload: files and commands reach the host', () => {
  calls.length = 0;
  const result = (exitCode, extra = {}) => ({ exitCode, timedOut: false, stdoutTail: '', stderrTail: '', durationMs: 3n, ...extra });
  assert.equal(sdk.files.readText('nginx.conf'), 'old');
  assert.equal(sdk.files.read('missing'), undefined);
  runResult = result(0);
  assert.equal(sdk.commands.check('check', 'nginx.conf.new').durationMs, 3n);
  sdk.files.rename('nginx.conf.new', 'nginx.conf');
  sdk.commands.trigger('reload');
  sdk.commands.signal('nginx');
  sdk.files.remove('stale.conf');
  assert.deepEqual(calls, [
    ['read', 'nginx.conf'],
    ['read', 'missing'],
    ['run', 'check', 'nginx.conf.new'],
    ['rename', 'nginx.conf.new', 'nginx.conf'],
    ['trigger', 'reload', undefined],
    ['signal', 'nginx'],
    ['remove', 'stale.conf'],
  ]);
  // A failing check is a result from run and an error from check, naming
  // the command and ending with its stderr.
  runResult = result(1, { stderrTail: 'emerg: unknown directive\n' });
  assert.equal(sdk.commands.run('check').exitCode, 1);
  assert.throws(
    () => sdk.commands.check('check'),
    (e) => e instanceof sdk.CapabilityError && e.capability === 'commands' && e.message === 'command "check" exited 1: emerg: unknown directive',
  );
  runResult = result(undefined, { timedOut: true });
  assert.throws(() => sdk.commands.check('check'), { message: 'command "check" timed out' });
  assert.throws(
    () => sdk.commands.run('missing'),
    (e) => e instanceof sdk.CapabilityError && /not granted; granted: check/.test(e.message),
  );
});

test('js-event-log lines: as the Rust unit tests state them', () => {
  const line = (o) => jsonLine(new sdk.Event(raw(o)));
  assert.equal(
    line({}),
    '{"source":"etcd","kind":"put","key":"app/port","value":"8080","revision":7,"resync":false,"coalesced":0}\n',
  );
  assert.match(line({ value: new Uint8Array([0xff, 0x00, 0x41]) }), /"value_b64":"\/wBB"/);
  assert.ok(line({ metadata: [['fencing_token', '42']] }).endsWith('"coalesced":0,"fencing_token":42}\n'));
  assert.equal(
    line({ kind: 'delete', value: undefined, resync: true, coalesced: 3 }),
    '{"source":"etcd","kind":"delete","key":"app/port","revision":7,"resync":true,"coalesced":3}\n',
  );
  assert.equal(line({ revision: 18446744073709551615n }).includes('"revision":18446744073709551615,'), true);
  for (const n of [0, 1, 2, 3, 4, 5, 255]) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 97 + 13) & 255);
    assert.equal(base64(bytes), Buffer.from(bytes).toString('base64'));
  }
});

test('js-chat-notify message: placeholders once, values cut by characters', () => {
  const e = new sdk.Event(raw({ value: enc('{key}ünïcödé'), prevValue: new Uint8Array([0xff, 0xfe]) }));
  assert.equal(message(e, '{key}: {prev_value} -> {value} @{revision}', 6), 'app/port: <2 bytes> -> {key}ü… @7');
});
