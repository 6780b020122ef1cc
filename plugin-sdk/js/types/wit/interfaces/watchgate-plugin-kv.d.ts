declare module 'watchgate:plugin/kv@0.1.0' {
  /**
   * Set `key` to `value` in `source`.
   */
  export function put(source: string, key: string, value: Uint8Array): void;
  /**
   * Remove `key` from `source`.
   */
  export { _delete as delete };
  function _delete(source: string, key: string): void;
}
