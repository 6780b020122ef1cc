declare module 'watchgate:plugin/snapshot@0.1.0' {
  /**
   * The current value of `key`; `none` when absent or deleted.
   */
  export function get(source: string, key: string): Uint8Array | undefined;
  /**
   * Every present key under `prefix`, in key order (at most 10,000).
   * Fails, naming the limit, when the keys and values would pass 4 MiB.
   */
  export function scan(source: string, prefix: string): Array<[string, Uint8Array]>;
}
