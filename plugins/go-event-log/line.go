// Command go-event-log appends every event to events.jsonl in the plugin's
// files grant, one JSON line per event, byte for byte as the Rust event-log
// plugin writes it (same field order, `value` or `value_b64`,
// `fencing_token` when present).
package main

import (
	"encoding/base64"
	"strconv"
	"unicode/utf8"

	"watchgate.dev/sdk"
)

// main is never called: the plugin is a reactor, driven by its exports.
func main() {}

// jsonLine formats e as one JSON object followed by a newline.
func jsonLine(e *watchgate.Event) []byte {
	b := make([]byte, 0, 128+len(e.Key)+len(e.Value))
	b = append(b, `{"source":`...)
	b = appendJSONString(b, e.Source)
	b = append(b, `,"kind":`...)
	b = appendJSONString(b, e.Kind.String())
	b = append(b, `,"key":`...)
	b = appendJSONString(b, e.Key)
	if e.HasValue {
		if utf8.Valid(e.Value) {
			b = append(b, `,"value":`...)
			b = appendJSONString(b, string(e.Value))
		} else {
			b = append(b, `,"value_b64":"`...)
			b = base64.StdEncoding.AppendEncode(b, e.Value)
			b = append(b, '"')
		}
	}
	b = append(b, `,"revision":`...)
	b = strconv.AppendUint(b, e.Revision, 10)
	b = append(b, `,"resync":`...)
	b = strconv.AppendBool(b, e.Resync)
	b = append(b, `,"coalesced":`...)
	b = strconv.AppendUint(b, uint64(e.Coalesced), 10)
	if t, ok := e.Meta("fencing_token"); ok {
		if n, err := strconv.ParseUint(t, 10, 64); err == nil {
			b = append(b, `,"fencing_token":`...)
			b = strconv.AppendUint(b, n, 10)
		}
	}
	return append(b, "}\n"...)
}

// appendJSONString quotes s the way serde_json does: only `"`, `\` and
// control characters are escaped (short forms where JSON has them), so the
// lines match the Rust event-log's byte for byte.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			b = append(b, '\\', '"')
		case c == '\\':
			b = append(b, '\\', '\\')
		case c == '\n':
			b = append(b, '\\', 'n')
		case c == '\r':
			b = append(b, '\\', 'r')
		case c == '\t':
			b = append(b, '\\', 't')
		case c == '\b':
			b = append(b, '\\', 'b')
		case c == '\f':
			b = append(b, '\\', 'f')
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}
