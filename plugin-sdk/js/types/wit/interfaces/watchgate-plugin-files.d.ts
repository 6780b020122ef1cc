declare module 'watchgate:plugin/files@0.1.0' {
  /**
   * Append bytes to a file, creating it (and its parent directories).
   */
  export function append(path: string, data: Uint8Array): void;
  /**
   * Replace a file's contents atomically (write a temporary file, then
   * rename it over the target).
   */
  export function replace(path: string, data: Uint8Array): void;
}
