// Write watchgate plugins in JavaScript.
//
// A plugin module default-exports a subclass of `Plugin` (or an instance, or
// an object with a `handle(event)` method); `build.mjs` wraps it into the
// `handle` and `handle-batch` exports of the `watchgate:plugin@0.1.0` world
// and componentize-js turns the bundle into a component. The plugin reacts
// through `log`, `state`, `settings`, `files`, `http`, `kv`, `snapshot` and
// `commands`.
//
// This module owns the mapping between the bindings componentize-js gives
// (camelCase records, `bigint` for u64, thrown values for `result` errors)
// and the API below. Limits, grants and retries belong to the host.

import * as hostLog from 'watchgate:plugin/log@0.1.0';
import * as hostState from 'watchgate:plugin/state@0.1.0';
import * as hostSettings from 'watchgate:plugin/settings@0.1.0';
import * as hostFiles from 'watchgate:plugin/files@0.1.0';
import * as hostHttp from 'watchgate:plugin/http@0.1.0';
import * as hostKv from 'watchgate:plugin/kv@0.1.0';
import * as hostSnapshot from 'watchgate:plugin/snapshot@0.1.0';
import * as hostCommands from 'watchgate:plugin/commands@0.1.0';

const utf8Strict = new TextDecoder('utf-8', { fatal: true });
const utf8Encoder = new TextEncoder();

/** Decodes UTF-8; `undefined` when the bytes are not valid UTF-8. */
function decodeUtf8(bytes) {
  if (bytes === undefined) return undefined;
  try {
    return utf8Strict.decode(bytes);
  } catch {
    return undefined;
  }
}

/** Strings become their UTF-8 bytes; byte arrays pass through. */
function toBytes(data, what) {
  if (typeof data === 'string') return utf8Encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  throw new TypeError(`${what} must be a string or bytes, not ${typeof data}`);
}

/**
 * The message a thrown value stands for. An `Error` gives its message (with
 * its name when it is a subclass such as `TypeError`); a capability error
 * from the host keeps the host's text.
 */
export function errorMessage(err) {
  if (err instanceof Error) {
    // These carry a message meant to be the error as it is.
    if (err instanceof CapabilityError || err instanceof BatchError) return err.message;
    const name = err.name && err.name !== 'Error' ? `${err.name}: ` : '';
    return `${name}${err.message}`;
  }
  if (err !== null && typeof err === 'object' && typeof err.payload === 'string') return err.payload;
  return String(err);
}

/**
 * A host capability call that failed: not granted, refused by a bound, or
 * over a quota. `capability` names it (`files`, `http`, ...), `message` is
 * the host's text.
 */
export class CapabilityError extends Error {
  constructor(capability, message) {
    super(message);
    this.name = 'CapabilityError';
    this.capability = capability;
  }
}

/** Calls a host function whose WIT result is `result<_, string>`. */
function hostCall(capability, fn) {
  try {
    return fn();
  } catch (err) {
    // componentize-js throws the `err` payload of an imported `result` as
    // the `payload` of the thrown value.
    const payload = err !== null && typeof err === 'object' && 'payload' in err ? err.payload : err;
    throw new CapabilityError(capability, typeof payload === 'string' ? payload : errorMessage(payload));
  }
}

/** One change of one key in one source. */
export class Event {
  constructor(raw) {
    /** Name of the source in the gateway config (`[[source]] name`). */
    this.source = raw.source;
    /** `'put'` or `'delete'`. */
    this.kind = raw.kind;
    /** The key, relative to the source. */
    this.key = raw.key;
    /** The new value as bytes; `undefined` on delete. */
    this.value = raw.value;
    /** The value before this change, when the source knows it. */
    this.prevValue = raw.prevValue;
    /** The source's revision of this change (a `bigint`: it is a u64). */
    this.revision = raw.revision;
    /** True when synthesized by a relist rather than observed as a change. */
    this.resync = raw.resync;
    /** How many further changes of this key were folded into this event. */
    this.coalesced = raw.coalesced;
    /** Source-specific extras as `[name, value]` pairs. */
    this.metadata = raw.metadata;
  }

  /** True when the key was removed. */
  get isDelete() {
    return this.kind === 'delete';
  }

  /** True when the key was created or changed. */
  get isPut() {
    return this.kind === 'put';
  }

  /** The new value as text; `undefined` on delete or when not valid UTF-8. */
  valueText() {
    return decodeUtf8(this.value);
  }

  /** The previous value as text; `undefined` when unknown or not UTF-8. */
  prevValueText() {
    return decodeUtf8(this.prevValue);
  }

  /** The first metadata value stored under `name`. */
  meta(name) {
    const found = this.metadata.find(([k]) => k === name);
    return found === undefined ? undefined : found[1];
  }
}

/** Why a batch stopped: every event before `index` was handled. */
export class BatchError extends Error {
  constructor(index, message) {
    super(message);
    this.name = 'BatchError';
    this.index = index;
  }
}

/**
 * A watchgate plugin. Override `handle(event)`; throw to fail the event
 * (the gateway counts and logs it, retries it, then dead-letters it). The
 * host may replace the instance at any time, so keep anything that must
 * outlive it in `state`.
 */
export class Plugin {
  /** Handle one event. */
  handle(event) {
    throw new Error(`${this.constructor.name} does not implement handle(event)`);
  }

  /**
   * Handle several events in order. The default calls `handle` for each and
   * stops at the first that throws, reporting its index.
   */
  handleBatch(events) {
    for (let index = 0; index < events.length; index++) {
      try {
        this.handle(events[index]);
      } catch (err) {
        if (isOutOfMemory(err)) throw err;
        throw new BatchError(index, errorMessage(err));
      }
    }
  }
}

/**
 * SpiderMonkey reports a refused allocation as the string thrown below.
 * The instance it happens in still holds whatever filled its memory, so
 * instead of returning an error the export traps: the host then counts the
 * call as `memory` and replaces the instance with a fresh one.
 */
function isOutOfMemory(err) {
  return err === 'out of memory' || (err instanceof Error && err.name === 'InternalError' && err.message === 'out of memory');
}

/**
 * An error payload componentize-js cannot lower as a string: its glue then
 * aborts, which is the only trap a JS export can cause on purpose.
 */
const TRAP = Symbol('trap');

function trapOutOfMemory(what) {
  hostLog.log('error', `${what}: out of memory in the JavaScript heap; trapping so the host replaces this instance`);
  return { tag: 'err', val: TRAP };
}

function refusePromise(result, what) {
  if (result !== null && typeof result === 'object' && typeof result.then === 'function') {
    throw new Error(`${what} returned a Promise; watchgate calls are synchronous, so it must not be async`);
  }
}

/**
 * The component's exports for `plugin`: a `Plugin` subclass, an instance,
 * or any object with `handle` (and optionally `handleBatch`). Every thrown
 * value becomes the call's error string instead of a trap, because
 * componentize-js traps when a thrown `Error` reaches a `result` export.
 */
export function exportsFor(plugin) {
  const instance = typeof plugin === 'function' ? new plugin() : plugin;
  if (instance === null || typeof instance !== 'object' || typeof instance.handle !== 'function') {
    throw new TypeError('the plugin module must default-export a Plugin subclass or an object with handle(event)');
  }
  const batch =
    typeof instance.handleBatch === 'function'
      ? (events) => instance.handleBatch(events)
      : (events) => Plugin.prototype.handleBatch.call(instance, events);
  return {
    handle(raw) {
      try {
        refusePromise(instance.handle(new Event(raw)), 'handle');
      } catch (err) {
        if (isOutOfMemory(err)) return trapOutOfMemory('handle');
        return { tag: 'err', val: errorMessage(err) };
      }
      return { tag: 'ok', val: undefined };
    },
    handleBatch(raws) {
      const events = raws.map((raw) => new Event(raw));
      try {
        refusePromise(batch(events), 'handleBatch');
      } catch (err) {
        if (isOutOfMemory(err)) return trapOutOfMemory('handleBatch');
        const index = err instanceof BatchError && Number.isInteger(err.index) && err.index >= 0 ? err.index : 0;
        return { tag: 'err', val: { index: Math.min(index, 0xffffffff), message: errorMessage(err) } };
      }
      return { tag: 'ok', val: undefined };
    },
  };
}

/**
 * Log lines into the gateway's own log, tagged with the plugin name and
 * rate limited per plugin by the host. `console.log` also works (it goes to
 * the plugin's stdout, which the host logs), but carries no level.
 */
export const log = {
  /** Write one line at `level`: `trace`, `debug`, `info`, `warn` or `error`. */
  log(level, message) {
    hostLog.log(level, String(message));
  },
  trace(message) {
    hostLog.log('trace', String(message));
  },
  debug(message) {
    hostLog.log('debug', String(message));
  },
  info(message) {
    hostLog.log('info', String(message));
  },
  warn(message) {
    hostLog.log('warn', String(message));
  },
  error(message) {
    hostLog.log('error', String(message));
  },
};

/**
 * The per-plugin key/value store owned by the host; it survives instance
 * recycling and plugin replacement.
 */
export const state = {
  /** The value as bytes; `undefined` when unset. */
  get(key) {
    return hostState.get(key);
  },
  /** The value as text; `undefined` when unset or not valid UTF-8. */
  getText(key) {
    return decodeUtf8(hostState.get(key));
  },
  /**
   * Set a value (string or bytes), or remove it with `undefined` or
   * `null`. Throws `CapabilityError` over the quota or when the host's
   * store stays busy until the deadline is near.
   */
  set(key, value) {
    const bytes = value === undefined || value === null ? undefined : toBytes(value, 'state value');
    hostCall('state', () => hostState.set(key, bytes));
  },
};

/** The operator's settings for this plugin (the sidecar's `[settings]`). */
export const settings = {
  /** The setting as text (TOML values other than strings in TOML form). */
  get(name) {
    return hostSettings.get(name);
  },
};

/**
 * The directory granted with `[grants] files`: write, read, rename and
 * remove files in it. Paths are relative to it. Throws `CapabilityError`
 * when refused.
 */
export const files = {
  /** Append a string or bytes to a file, creating it and its parents. */
  append(path, data) {
    const bytes = toBytes(data, 'file data');
    hostCall('files', () => hostFiles.append(path, bytes));
  },
  /** Replace a file's contents atomically. */
  replace(path, data) {
    const bytes = toBytes(data, 'file data');
    hostCall('files', () => hostFiles.replace(path, bytes));
  },
  /** A file's contents as bytes; `undefined` when it does not exist. */
  read(path) {
    return hostCall('files', () => hostFiles.read(path));
  },
  /** A file's contents as text; `undefined` when absent or not valid UTF-8. */
  readText(path) {
    return decodeUtf8(files.read(path));
  },
  /**
   * Rename `from` over `to` atomically, both inside the grant (render to a
   * temporary name, check it, then put it in place).
   */
  rename(from, to) {
    hostCall('files', () => hostFiles.rename(from, to));
  },
  /** Remove a file; one that does not exist is not an error. */
  remove(path) {
    hostCall('files', () => hostFiles.remove(path));
  },
};

/**
 * Commands and signals the operator granted by name (`[grants] commands`,
 * `[grants] signals`). A plugin names an entry; it never chooses the argv.
 * `file`, a path inside the `files` grant, replaces `{file}` in the granted
 * argv. Throws `CapabilityError` when refused.
 */
export const commands = {
  /**
   * Run command `name` and wait for it to end. Returns `{ exitCode,
   * timedOut, stdoutTail, stderrTail, durationMs }` (`exitCode` is
   * `undefined` when it was killed, `durationMs` a `bigint`); a command
   * that fails is a result, not an error.
   */
  run(name, file) {
    return hostCall('commands', () => hostCommands.run(name, file ?? undefined));
  },
  /**
   * `run`, throwing `CapabilityError` unless the command exited 0; its
   * message names the command, how it ended and the end of its stderr.
   */
  check(name, file) {
    const result = commands.run(name, file);
    if (result.exitCode !== 0) {
      const how = result.timedOut ? 'timed out' : result.exitCode === undefined ? 'was killed' : `exited ${result.exitCode}`;
      const tail = result.stderrTail.trim() || result.stdoutTail.trim();
      throw new CapabilityError('commands', `command ${JSON.stringify(name)} ${how}${tail ? `: ${tail}` : ''}`);
    }
    return result;
  },
  /**
   * Start command `name` in the background (a reload) and return at once;
   * asked again while it runs, it runs once more after it ends.
   */
  trigger(name, file) {
    hostCall('commands', () => hostCommands.trigger(name, file ?? undefined));
  },
  /** Send SIGHUP to the process whose pid file is granted as `name`. */
  signal(name) {
    hostCall('commands', () => hostCommands.signal(name));
  },
};

/**
 * Outbound HTTP to hosts granted with `[grants] http`. Requests are queued
 * and sent by the host in the background; the plugin never sees the
 * response. Throws `CapabilityError` when refused.
 */
export const http = {
  /**
   * Queue `{ method, url, headers?, body? }` (headers as `[name, value]`
   * pairs or a plain object, body as string or bytes). Returns the request
   * id (a `bigint`) the gateway logs it under.
   */
  send(request) {
    const headers = Array.isArray(request.headers)
      ? request.headers.map(([k, v]) => [String(k), String(v)])
      : Object.entries(request.headers ?? {}).map(([k, v]) => [k, String(v)]);
    const body = request.body === undefined || request.body === null ? undefined : toBytes(request.body, 'request body');
    return hostCall('http', () => hostHttp.send({ method: request.method, url: request.url, headers, body }));
  },
  /**
   * Queue a `POST` of JSON to `url`: a string or bytes are sent as they
   * are, anything else through `JSON.stringify`.
   */
  postJson(url, body) {
    const text = typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body);
    return http.send({ method: 'POST', url, headers: [['content-type', 'application/json']], body: text });
  },
};

/**
 * Writes back into a writable source (etcd) under prefixes granted with
 * `[grants] kv`; queued and performed by the host in order. Throws
 * `CapabilityError` when refused.
 */
export const kv = {
  /** Set `key` to `value` (string or bytes) in `source`. */
  put(source, key, value) {
    const bytes = toBytes(value, 'kv value');
    hostCall('kv', () => hostKv.put(source, key, bytes));
  },
  /** Remove `key` from `source`. */
  delete(source, key) {
    hostCall('kv', () => hostKv.delete(source, key));
  },
};

/**
 * The gateway's current view of subscribed keys (`[grants] snapshot`).
 * Throws `CapabilityError` when not granted or not subscribed.
 */
export const snapshot = {
  /** The current value of `key` as bytes; `undefined` when absent. */
  get(source, key) {
    return hostCall('snapshot', () => hostSnapshot.get(source, key));
  },
  /** Every present key under `prefix`, in key order, as `[key, bytes]`. */
  scan(source, prefix) {
    return hostCall('snapshot', () => hostSnapshot.scan(source, prefix));
  },
};
