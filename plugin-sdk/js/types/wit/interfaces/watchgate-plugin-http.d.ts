declare module 'watchgate:plugin/http@0.1.0' {
  /**
   * Queue a request. Returns its id at once. Fails when the host is not
   * granted, the request is malformed, or the plugin already has its
   * maximum of requests in flight.
   */
  export function send(request: Request): bigint;
  /**
   * One outbound request.
   */
  export interface Request {
    /**
     * `GET`, `POST`, `PUT`, `PATCH`, `DELETE` or `HEAD`.
     */
    method: string,
    /**
     * An absolute `http://` or `https://` URL on a granted host.
     */
    url: string,
    /**
     * Request headers.
     */
    headers: Array<[string, string]>,
    /**
     * Request body.
     */
    body?: Uint8Array,
  }
}
