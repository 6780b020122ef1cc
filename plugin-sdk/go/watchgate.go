// Package watchgate lets a watchgate plugin be written in Go.
//
// A plugin is a value implementing [Handler], registered with [Register]
// from an init function of package main. The gateway hands it one [Event]
// per change of a watched key; the plugin reacts through the host
// capabilities ([Log], [StateGet], [FilesAppend], [HTTPSend], [KVPut],
// [SnapshotGet], ...). Build with upstream Go (1.26 or newer) as a wasip1
// reactor and turn the core module into a component with the WASI preview1
// reactor adapter; scripts/build-go-plugins does both.
//
// The package owns the canonical-ABI mapping between the WIT world
// `watchgate:plugin@0.1.0` (plugin-sdk/wit/plugin.wit) and this Go API; the
// bindings are written by hand in this package, not generated.
package watchgate

// EventKind says what happened to a key.
type EventKind uint8

const (
	// Put: the key was created or its value changed.
	Put EventKind = 0
	// Delete: the key was removed.
	Delete EventKind = 1
)

// String is "put" or "delete", the names used in logs and files.
func (k EventKind) String() string {
	if k == Delete {
		return "delete"
	}
	return "put"
}

// Event is one change of one key in one source.
type Event struct {
	// Source is the name of the source in the gateway config.
	Source string
	// Kind is Put or Delete.
	Kind EventKind
	// Key is relative to the source.
	Key string
	// Value is the new value; nil on delete (HasValue tells an empty value
	// from none).
	Value    []byte
	HasValue bool
	// PrevValue is the value before this change, when the source knows it.
	PrevValue    []byte
	HasPrevValue bool
	// Revision of this change in the source; never decreases per key.
	Revision uint64
	// Resync is true when a relist synthesized the event.
	Resync bool
	// Coalesced counts further changes of this key folded into this event.
	Coalesced uint32
	// Metadata holds source-specific extras, in the source's order.
	Metadata [][2]string
}

// Meta returns the first metadata value stored under name.
func (e *Event) Meta(name string) (string, bool) {
	for _, kv := range e.Metadata {
		if kv[0] == name {
			return kv[1], true
		}
	}
	return "", false
}

// Handler handles events. Returning an error counts and logs the failure in
// the gateway, which retries the event and finally dead-letters it. A panic
// traps the instance, which the host replaces.
type Handler interface {
	Handle(e Event) error
}

// BatchHandler may be implemented to handle a batch at once; without it a
// batch calls Handle for each event and stops at the first error.
type BatchHandler interface {
	HandleBatch(events []Event) (failedIndex int, err error)
}

var handler Handler

// Register sets the plugin's handler. Call it once, from init in package
// main: a reactor module runs package initialisation but never main.
func Register(h Handler) {
	handler = h
}
