declare module 'watchgate:plugin/types@0.1.0' {
  /**
   * What happened to a key.
   * # Variants
   * 
   * ## `"put"`
   * 
   * The key was created or its value changed.
   * ## `"delete"`
   * 
   * The key was removed.
   */
  export type EventKind = 'put' | 'delete';
  /**
   * One change of one key in one source.
   */
  export interface Event {
    /**
     * Name of the source in the gateway config (`[[source]] name`).
     */
    source: string,
    /**
     * Put or delete.
     */
    kind: EventKind,
    /**
     * The key, relative to the source (for the file source: the path
     * relative to the watched directory, with `/` separators).
     */
    key: string,
    /**
     * The new value; `none` on delete.
     */
    value?: Uint8Array,
    /**
     * The value before this change, when the source knows it.
     */
    prevValue?: Uint8Array,
    /**
     * The source's revision of this change; never decreases per key.
     */
    revision: bigint,
    /**
     * True when the event was synthesized by a relist rather than
     * observed as a change (for example a delete found by diffing after
     * a gap in the source's history).
     */
    resync: boolean,
    /**
     * How many further changes of this key were folded into this event
     * because the plugin's queue was full (0 when none).
     */
    coalesced: number,
    /**
     * Source-specific extras (for example an MD5, a content hash).
     */
    metadata: Array<[string, string]>,
  }
  /**
   * Which events of a batch were handled.
   */
  export interface BatchError {
    /**
     * Index of the first event that was not handled; all events before
     * it were.
     */
    index: number,
    /**
     * Why handling stopped.
     */
    message: string,
  }
}
