declare module 'watchgate:plugin/settings@0.1.0' {
  /**
   * The setting `name` as text (strings as written, other TOML values in
   * their TOML form); `none` when unset.
   */
  export function get(name: string): string | undefined;
}
