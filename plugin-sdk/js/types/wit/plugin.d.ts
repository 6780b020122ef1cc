/// <reference path="./interfaces/watchgate-plugin-commands.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-files.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-http.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-kv.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-log.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-settings.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-snapshot.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-state.d.ts" />
/// <reference path="./interfaces/watchgate-plugin-types.d.ts" />
declare module 'watchgate:plugin/plugin@0.1.0' {
  export type Event = import('watchgate:plugin/types@0.1.0').Event;
  export type BatchError = import('watchgate:plugin/types@0.1.0').BatchError;
  export type * as WatchgatePluginCommands010 from 'watchgate:plugin/commands@0.1.0'; // import watchgate:plugin/commands@0.1.0
  export type * as WatchgatePluginFiles010 from 'watchgate:plugin/files@0.1.0'; // import watchgate:plugin/files@0.1.0
  export type * as WatchgatePluginHttp010 from 'watchgate:plugin/http@0.1.0'; // import watchgate:plugin/http@0.1.0
  export type * as WatchgatePluginKv010 from 'watchgate:plugin/kv@0.1.0'; // import watchgate:plugin/kv@0.1.0
  export type * as WatchgatePluginLog010 from 'watchgate:plugin/log@0.1.0'; // import watchgate:plugin/log@0.1.0
  export type * as WatchgatePluginSettings010 from 'watchgate:plugin/settings@0.1.0'; // import watchgate:plugin/settings@0.1.0
  export type * as WatchgatePluginSnapshot010 from 'watchgate:plugin/snapshot@0.1.0'; // import watchgate:plugin/snapshot@0.1.0
  export type * as WatchgatePluginState010 from 'watchgate:plugin/state@0.1.0'; // import watchgate:plugin/state@0.1.0
  export type * as WatchgatePluginTypes010 from 'watchgate:plugin/types@0.1.0'; // import watchgate:plugin/types@0.1.0
  /**
  * Handle one event. An error or a trap is counted, logged and retried
  * with backoff per the plugin's failure policy, then dead-lettered.
  */
  export function handle(event: Event): void;
  /**
  * Handle several events in order. The SDK implements this by calling
  * `handle` for each event.
  */
  export function handleBatch(events: Array<Event>): void;
  export type Result<T, E> = { tag: 'ok', val: T } | { tag: 'err', val: E };
}
