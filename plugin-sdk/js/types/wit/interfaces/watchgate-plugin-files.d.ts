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
  /**
   * A file's contents; `none` when it does not exist.
   */
  export function read(path: string): Uint8Array | undefined;
  /**
   * Rename a file over another atomically, both inside the grant.
   */
  export function rename(from: string, to: string): void;
  /**
   * Remove a file; a file that does not exist is not an error.
   */
  export function remove(path: string): void;
}
