package main

import (
	"testing"

	"watchgate.dev/sdk"
)

func put(key, value string) *watchgate.Event {
	return &watchgate.Event{Source: "s", Kind: watchgate.Put, Key: key, Value: []byte(value), HasValue: true}
}

func TestApplyTracksInvalidKeys(t *testing.T) {
	invalid := map[string]string{}
	if changed, reason := apply(invalid, put("a.json", `{"x":1}`)); changed || reason != "" {
		t.Fatalf("valid value: changed=%v reason=%q", changed, reason)
	}
	changed, reason := apply(invalid, put("b.json", `{"x":`))
	if !changed || reason == "" || invalid["s:b.json"] != reason {
		t.Fatalf("invalid value: changed=%v reason=%q map=%v", changed, reason, invalid)
	}
	if changed, _ := apply(invalid, put("b.json", `{"x":`)); changed {
		t.Fatal("the same invalid value again must not count as a change")
	}
	if changed, reason := apply(invalid, put("b.json", `[1]`)); !changed || reason != "" || len(invalid) != 0 {
		t.Fatalf("fixed value: changed=%v reason=%q map=%v", changed, reason, invalid)
	}
	apply(invalid, put("c.json", "nope"))
	del := &watchgate.Event{Source: "s", Kind: watchgate.Delete, Key: "c.json"}
	if changed, _ := apply(invalid, del); !changed || len(invalid) != 0 {
		t.Fatalf("delete: changed=%v map=%v", changed, invalid)
	}
}

func TestReportIsSortedOneLinePerKey(t *testing.T) {
	got := string(report(map[string]string{"s:b": "two", "s:a": "one"}))
	if got != "s:a: one\ns:b: two\n" {
		t.Fatalf("got %q", got)
	}
}
