package main

import (
	"testing"

	"watchgate.dev/sdk"
)

func event(kind watchgate.EventKind, value []byte, hasValue bool) watchgate.Event {
	return watchgate.Event{
		Source: "etcd", Kind: kind, Key: "app/port",
		Value: value, HasValue: hasValue, Revision: 7,
	}
}

func TestPutWithTextValue(t *testing.T) {
	got := string(jsonLine(ptr(event(watchgate.Put, []byte("8080"), true))))
	want := `{"source":"etcd","kind":"put","key":"app/port","value":"8080","revision":7,"resync":false,"coalesced":0}` + "\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestBinaryValueUsesBase64(t *testing.T) {
	got := string(jsonLine(ptr(event(watchgate.Put, []byte{0xff, 0x00, 0x41}, true))))
	want := `{"source":"etcd","kind":"put","key":"app/port","value_b64":"/wBB","revision":7,"resync":false,"coalesced":0}` + "\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestEmptyValueIsNotADelete(t *testing.T) {
	got := string(jsonLine(ptr(event(watchgate.Put, nil, true))))
	want := `{"source":"etcd","kind":"put","key":"app/port","value":"","revision":7,"resync":false,"coalesced":0}` + "\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestDeleteHasNoValue(t *testing.T) {
	e := event(watchgate.Delete, nil, false)
	e.Resync, e.Coalesced = true, 3
	got := string(jsonLine(&e))
	want := `{"source":"etcd","kind":"delete","key":"app/port","revision":7,"resync":true,"coalesced":3}` + "\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestFencingTokenWhenPresentAndNumeric(t *testing.T) {
	e := event(watchgate.Put, []byte("1"), true)
	e.Metadata = [][2]string{{"md5", "x"}, {"fencing_token", "42"}}
	got := string(jsonLine(&e))
	want := `{"source":"etcd","kind":"put","key":"app/port","value":"1","revision":7,"resync":false,"coalesced":0,"fencing_token":42}` + "\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	e.Metadata = [][2]string{{"fencing_token", "not-a-number"}}
	if got := string(jsonLine(&e)); got != string(jsonLine(ptr(event(watchgate.Put, []byte("1"), true)))) {
		t.Fatalf("a non-numeric token must be left out, got %q", got)
	}
}

// serde_json escapes only '"', '\\' and control characters; '<', '&',
// U+2028 and DEL pass through unescaped.
func TestEscapesLikeSerdeJSON(t *testing.T) {
	e := event(watchgate.Put, []byte("\"q\" \\ \x7f\x00"), true)
	e.Key = "a\n\t\r\b\f\x01<&>\u2028é"
	got := string(jsonLine(&e))
	want := `{"source":"etcd","kind":"put","key":"a\n\t\r\b\f\u0001<&>` + "\u2028é" + `","value":"\"q\" \\ ` + "\x7f" + `\u0000","revision":7,"resync":false,"coalesced":0}` + "\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func ptr[T any](v T) *T { return &v }
