declare module 'watchgate:plugin/commands@0.1.0' {
  /**
   * Run command `name` and wait for it to end (a check), at most its
   * timeout and the call's deadline.
   */
  export function run(name: string, file: string | undefined): RunResult;
  /**
   * Start command `name` in the background (a reload) and return at
   * once. Asked again while it runs, it runs once more after it ends,
   * however often it was asked.
   */
  export function trigger(name: string, file: string | undefined): void;
  /**
   * Send SIGHUP to the process whose id is in the pid file granted as
   * `name`.
   */
  export function signal(name: string): void;
  /**
   * How a command run ended.
   */
  export interface RunResult {
    /**
     * Its exit code; `none` when it was killed.
     */
    exitCode?: number,
    /**
     * Killed for passing its timeout (or the call's deadline).
     */
    timedOut: boolean,
    /**
     * The end of its standard output (at most 4 KiB).
     */
    stdoutTail: string,
    /**
     * The end of its standard error (at most 4 KiB).
     */
    stderrTail: string,
    /**
     * How long it ran, in milliseconds.
     */
    durationMs: bigint,
  }
}
