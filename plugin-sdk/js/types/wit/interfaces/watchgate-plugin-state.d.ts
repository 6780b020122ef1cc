declare module 'watchgate:plugin/state@0.1.0' {
  /**
   * Read a value; `none` when the key is unset.
   */
  export function get(key: string): Uint8Array | undefined;
  /**
   * Set a value, or remove it with `none`. Fails when the plugin's state
   * quota would be exceeded, or when too many of its writes wait for the
   * host's store until the call's deadline is near.
   */
  export function set(key: string, value: Uint8Array | undefined): void;
}
