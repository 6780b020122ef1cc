// Appends every event to `events.jsonl` in the plugin's files grant, one
// JSON object per line, with a single `files.append` per event so lines
// never interleave. The lines are byte for byte those of the Rust
// `event-log` plugin:
//
//   {"source":"etcd","kind":"put","key":"app/port","value":"8080","revision":7,"resync":false,"coalesced":0}
//
// `value` holds the value as text; a value that is not UTF-8 is written as
// `value_b64` (standard base64 with padding) instead; a delete has neither.
// In a cluster, `fencing_token` carries the owner's token.

import { Plugin, files } from '@watchgate/sdk';

const LOG_PATH = 'events.jsonl';

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/** Standard base64 with padding. */
export function base64(bytes) {
  let out = '';
  let i = 0;
  for (; i + 2 < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    out += B64[n >> 18] + B64[(n >> 12) & 63] + B64[(n >> 6) & 63] + B64[n & 63];
  }
  const rest = bytes.length - i;
  if (rest === 1) {
    const n = bytes[i] << 16;
    out += B64[n >> 18] + B64[(n >> 12) & 63] + '==';
  } else if (rest === 2) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8);
    out += B64[n >> 18] + B64[(n >> 12) & 63] + B64[(n >> 6) & 63] + '=';
  }
  return out;
}

/**
 * The fencing token as the Rust plugin writes it: the metadata value when it
 * parses as a u64 (decimal digits only, at most 2^64 - 1), else nothing.
 */
function fencingToken(text) {
  if (text === undefined || !/^\+?[0-9]+$/.test(text)) return undefined;
  const n = BigInt(text);
  return n <= 0xffffffffffffffffn ? n : undefined;
}

/** One event as one JSON line with its `\n`; field order is the line's. */
export function jsonLine(event) {
  const parts = [
    `"source":${JSON.stringify(event.source)}`,
    `"kind":${JSON.stringify(event.kind)}`,
    `"key":${JSON.stringify(event.key)}`,
  ];
  if (event.value !== undefined) {
    const text = event.valueText();
    parts.push(text === undefined ? `"value_b64":${JSON.stringify(base64(event.value))}` : `"value":${JSON.stringify(text)}`);
  }
  // revision and the token are u64: written from the bigint, never through
  // a double that would round them.
  parts.push(`"revision":${event.revision.toString()}`, `"resync":${event.resync}`, `"coalesced":${event.coalesced}`);
  const token = fencingToken(event.meta('fencing_token'));
  if (token !== undefined) parts.push(`"fencing_token":${token.toString()}`);
  return `{${parts.join(',')}}\n`;
}

export default class EventLog extends Plugin {
  handle(event) {
    const line = jsonLine(event);
    try {
      files.append(LOG_PATH, line);
    } catch (err) {
      throw new Error(`js-event-log: append to ${LOG_PATH} failed: ${err.message}`);
    }
  }
}
