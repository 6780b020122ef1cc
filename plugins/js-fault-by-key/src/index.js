// Test fixture for the JavaScript SDK: the event's key picks what the
// handler does, so one component covers every failure the host must
// contain.
//
//   error      throw new Error("boom")            -> outcome error "boom"
//   type-error read a property of undefined       -> error "TypeError: ..."
//   async      an async handler                   -> error naming the Promise
//   spin       loop forever                       -> out_of_fuel or timeout
//   alloc      keep 4 MiB buffers until refused   -> memory
//   count      add 1 to state "count", log it     -> ok; survives recycling
//   state      the same as count (the key the Rust, Python and Go fixtures use)
//   append     append the value to out.txt        -> error without a grant
//   anything else                                 -> ok

import { Plugin, files, log, state } from '@watchgate/sdk';

const kept = [];

export default class FaultByKey extends Plugin {
  handle(event) {
    switch (event.key) {
      case 'error':
        throw new Error('boom');
      case 'type-error': {
        const missing = undefined;
        return missing.field;
      }
      case 'async':
        return (async () => {})();
      case 'spin':
        for (;;) {}
      case 'alloc':
        for (;;) kept.push(new Uint8Array(4 << 20));
      case 'count':
      case 'state': {
        const n = Number(state.getText('count') ?? '0') + 1;
        state.set('count', String(n));
        log.info(`count=${n}`);
        return;
      }
      case 'append':
        files.append('out.txt', event.value ?? '');
        return;
      default:
        return;
    }
  }
}
