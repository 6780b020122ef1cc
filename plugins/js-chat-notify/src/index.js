// Posts one chat message per change to an incoming webhook, in the
// `{"text": "..."}` form Slack, Mattermost and Rocket.Chat accept.
//
// Settings (the sidecar's [settings]):
//   url            the webhook URL (required; its host:port must be granted)
//   template       the message; {source} {kind} {key} {value} {prev_value}
//                  {revision} are replaced (default below)
//   max_value_chars  values longer than this are cut, with "…" (default 200)
//   authorization  sent as the Authorization header when set
//
// A value that is not UTF-8 shows as "<N bytes>", a missing one as "-".

import { Plugin, http, settings } from '@watchgate/sdk';

const DEFAULT_TEMPLATE = '[{source}] {kind} `{key}` = {value} (revision {revision})';
const DEFAULT_MAX_VALUE_CHARS = 200;

function shown(bytes, text, max) {
  if (bytes === undefined) return '-';
  if (text === undefined) return `<${bytes.length} bytes>`;
  const chars = Array.from(text);
  return chars.length > max ? `${chars.slice(0, max).join('')}…` : text;
}

/** The message for `event` with `template` filled in. */
export function message(event, template, max) {
  const fields = {
    source: event.source,
    kind: event.kind,
    key: event.key,
    value: shown(event.value, event.valueText(), max),
    prev_value: shown(event.prevValue, event.prevValueText(), max),
    revision: event.revision.toString(),
  };
  // One pass, so a value containing "{key}" is not expanded again.
  return template.replace(/\{(source|kind|key|value|prev_value|revision)\}/g, (_, name) => fields[name]);
}

export default class ChatNotify extends Plugin {
  handle(event) {
    const url = settings.get('url');
    if (url === undefined) throw new Error('js-chat-notify: the "url" setting is missing');
    const maxSetting = settings.get('max_value_chars');
    const max = maxSetting === undefined ? DEFAULT_MAX_VALUE_CHARS : Number(maxSetting);
    if (!Number.isInteger(max) || max < 0) {
      throw new Error(`js-chat-notify: "max_value_chars" must be a whole number, not ${maxSetting}`);
    }
    const text = message(event, settings.get('template') ?? DEFAULT_TEMPLATE, max);
    const headers = [['content-type', 'application/json']];
    const authorization = settings.get('authorization');
    if (authorization !== undefined) headers.push(['authorization', authorization]);
    http.send({ method: 'POST', url, headers, body: JSON.stringify({ text }) });
  }
}
