// Declarations for the watchgate JavaScript SDK (src/index.js). The WIT
// interfaces it wraps are declared in ../types/wit, generated from
// plugin-sdk/wit by `jco guest-types`.

/// <reference path="../types/wit/plugin.d.ts" />

/** `'put'` or `'delete'`. */
export type EventKind = import('watchgate:plugin/types@0.1.0').EventKind;

/** Log severities. */
export type Level = import('watchgate:plugin/log@0.1.0').Level;

/** Data the SDK turns into bytes: strings as UTF-8. */
export type Bytes = string | Uint8Array | ArrayBufferView | ArrayBuffer;

/** One change of one key in one source. */
export class Event {
  /** Name of the source in the gateway config (`[[source]] name`). */
  readonly source: string;
  /** Put or delete. */
  readonly kind: EventKind;
  /** The key, relative to the source. */
  readonly key: string;
  /** The new value; `undefined` on delete. */
  readonly value: Uint8Array | undefined;
  /** The value before this change, when the source knows it. */
  readonly prevValue: Uint8Array | undefined;
  /** The source's revision of this change; never decreases per key. */
  readonly revision: bigint;
  /** True when synthesized by a relist rather than observed as a change. */
  readonly resync: boolean;
  /** How many further changes of this key were folded into this event. */
  readonly coalesced: number;
  /** Source-specific extras as `[name, value]` pairs. */
  readonly metadata: Array<[string, string]>;
  /** True when the key was removed. */
  readonly isDelete: boolean;
  /** True when the key was created or changed. */
  readonly isPut: boolean;
  /** The new value as text; `undefined` on delete or when not UTF-8. */
  valueText(): string | undefined;
  /** The previous value as text; `undefined` when unknown or not UTF-8. */
  prevValueText(): string | undefined;
  /** The first metadata value stored under `name`. */
  meta(name: string): string | undefined;
}

/** Why a batch stopped: every event before `index` was handled. */
export class BatchError extends Error {
  constructor(index: number, message: string);
  readonly index: number;
}

/** A host capability call that failed (not granted, refused, over quota). */
export class CapabilityError extends Error {
  constructor(capability: string, message: string);
  readonly capability: string;
}

/**
 * A watchgate plugin: default-export a subclass from the plugin module.
 * Throwing fails the event; the thrown value's message becomes the call's
 * error. Calls are synchronous: an `async` handler is refused.
 */
export class Plugin {
  handle(event: Event): void;
  /** Calls `handle` for each event; stops at the first that throws. */
  handleBatch(events: Event[]): void;
}

/** The message a thrown value stands for. */
export function errorMessage(err: unknown): string;

/** Used by build.mjs: the component exports for a plugin. */
export function exportsFor(plugin: (new () => { handle(event: Event): void }) | { handle(event: Event): void }): {
  handle(event: import('watchgate:plugin/types@0.1.0').Event): { tag: 'ok'; val: undefined } | { tag: 'err'; val: string };
  handleBatch(
    events: Array<import('watchgate:plugin/types@0.1.0').Event>,
  ): { tag: 'ok'; val: undefined } | { tag: 'err'; val: import('watchgate:plugin/types@0.1.0').BatchError };
};

export const log: {
  log(level: Level, message: unknown): void;
  trace(message: unknown): void;
  debug(message: unknown): void;
  info(message: unknown): void;
  warn(message: unknown): void;
  error(message: unknown): void;
};

export const state: {
  get(key: string): Uint8Array | undefined;
  getText(key: string): string | undefined;
  /** Throws `CapabilityError` over the quota. `undefined`/`null` removes. */
  set(key: string, value: Bytes | undefined | null): void;
};

export const settings: {
  get(name: string): string | undefined;
};

export const files: {
  append(path: string, data: Bytes): void;
  replace(path: string, data: Bytes): void;
  read(path: string): Uint8Array | undefined;
  readText(path: string): string | undefined;
  rename(from: string, to: string): void;
  remove(path: string): void;
};

export interface RunResult {
  /** `undefined` when the command was killed. */
  exitCode?: number;
  timedOut: boolean;
  stdoutTail: string;
  stderrTail: string;
  durationMs: bigint;
}

export const commands: {
  run(name: string, file?: string): RunResult;
  /** `run`, throwing `CapabilityError` unless the command exited 0. */
  check(name: string, file?: string): RunResult;
  trigger(name: string, file?: string): void;
  signal(name: string): void;
};

export interface HttpRequest {
  method: string;
  url: string;
  headers?: Array<[string, string]> | Record<string, string>;
  body?: Bytes;
}

export const http: {
  /** Returns the request id the gateway logs it under. */
  send(request: HttpRequest): bigint;
  postJson(url: string, body: unknown): bigint;
};

export const kv: {
  put(source: string, key: string, value: Bytes): void;
  delete(source: string, key: string): void;
};

export const snapshot: {
  get(source: string, key: string): Uint8Array | undefined;
  scan(source: string, prefix: string): Array<[string, Uint8Array]>;
};
