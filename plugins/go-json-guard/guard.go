// Command go-json-guard checks every value written to a key ending in
// `.json` (setting `suffix` changes it) and keeps `invalid-json.txt` in its
// files grant current: one line per key whose value is not valid JSON, with
// the parser's reason, in key order. The set of invalid keys lives in host
// state, so it survives restarts and instance recycling. With setting
// `reject = "true"` an invalid value also fails the event, so it is retried
// and then dead-lettered where operators look for failures.
package main

import (
	"encoding/json"
	"sort"
	"strings"

	"watchgate.dev/sdk"
)

// The state key holding the invalid keys and their reasons as a JSON object.
const stateKey = "invalid"

// The report file, relative to the files grant.
const reportPath = "invalid-json.txt"

// main is never called: the plugin is a reactor, driven by its exports.
func main() {}

// check returns why value is not valid JSON, or "" when it is.
func check(value []byte) string {
	var v any
	if err := json.Unmarshal(value, &v); err != nil {
		return err.Error()
	}
	return ""
}

// report formats the invalid keys, sorted, one "key: reason" per line.
func report(invalid map[string]string) []byte {
	keys := make([]string, 0, len(invalid))
	for k := range invalid {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + ": " + invalid[k] + "\n")
	}
	return []byte(b.String())
}

// apply updates invalid for event e and says whether it changed and why
// the value is invalid ("" when it is valid or the key was deleted).
func apply(invalid map[string]string, e *watchgate.Event) (changed bool, reason string) {
	id := e.Source + ":" + e.Key
	old, had := invalid[id]
	if e.Kind == watchgate.Delete {
		delete(invalid, id)
		return had, ""
	}
	reason = check(e.Value)
	if reason == "" {
		delete(invalid, id)
		return had, ""
	}
	invalid[id] = reason
	return !had || old != reason, reason
}
