//go:build wasip1

package watchgate

import (
	"encoding/binary"
	"strings"
	"unicode/utf8"
	"unsafe"
)

// ArenaBytes is the size of the arena reserved in the module itself (see
// arena.go): the most bytes the host may pass in one piece, that is all
// the arguments of one export call (a batch of events with their values
// and previous values, keys and metadata) or all the results of one import
// call (a snapshot scan, a state value), plus up to 7 bytes of alignment
// per list. ReserveArena makes it larger.
const ArenaBytes = 16 << 20

// The arena's first memory: a global without pointers, so it lies in the
// module's zero-initialised data (its pages count in the instance's initial
// memory but are only backed once written), outside the Go heap: the
// collector neither scans nor counts it, and it never moves.
var arenaStatic [ArenaBytes]byte

var hostArena = newArena(arenaStatic[:], addr(&arenaStatic[0]))

// ReserveArena makes the arena hold at least n bytes (see ArenaBytes), for
// a plugin that receives larger events or scans: the memory is taken from
// the Go heap now, so call it from init (or a handler), never more than
// needed, as it is kept for good. A smaller n changes nothing.
func ReserveArena(n int) {
	if n <= len(hostArena.buf) {
		return
	}
	if hostArena.used != 0 {
		panic("watchgate: ReserveArena while the host's data is being read")
	}
	buf := make([]byte, n)
	hostArena = newArena(buf, addr(&buf[0]))
}

// The memory of the call in progress that must outlive it: the return area
// and the error text of the last export, read by the host after the export
// returns.
var (
	retArea  area
	retBytes []byte
)

// cabiRealloc runs while the host lowers values into linear memory, when
// calling any import traps the instance. It is nosplit (no stack check, so
// no stack growth and no preemption point) and calls only hostArena.alloc
// (nosplit, which allocates nothing and calls only runtime.memmove) and,
// when the arena is full, arenaExhausted (a trap in the adapter): none of
// these reach an import.
//
//go:wasmexport cabi_realloc
//go:nosplit
func cabiRealloc(oldPtr, oldSize, align, newSize uint32) uint32 {
	p := hostArena.alloc(oldPtr, oldSize, align, newSize)
	if p == 0 {
		arenaExhausted()
	}
	return p
}

// arenaExhausted traps the instance with `unreachable` (in the adapter;
// Go code cannot trap without its runtime, which prints through an
// import): the host passed more than the arena holds in one piece. The
// trap's backtrace names this import. Nothing was written: the host
// writes only where cabi_realloc pointed.
//
//go:wasmimport wasi_snapshot_preview1 watchgate_arena_exhausted
func arenaExhausted()

// release empties the arena once the host's data has been read (copied
// into Go memory).
func release() {
	hostArena.reset()
}

// mem returns the n bytes the host wrote at address p. Every list and
// string the host passes in (export arguments, import results) lies in the
// arena, in what cabi_realloc handed out since the last release, so the
// bytes are read through the arena's slice, bounds-checked, never through
// a raw address.
func mem(p, n uint32) []byte {
	if n == 0 {
		return nil
	}
	b, ok := hostArena.bytes(p, n)
	if !ok {
		panic("watchgate: the host passed memory not allocated by cabi_realloc")
	}
	return b
}

func stringAt(p, n uint32) string { return string(mem(p, n)) }

func le32(b []byte, off uint32) uint32 { return binary.LittleEndian.Uint32(b[off:]) }
func le64(b []byte, off uint32) uint64 { return binary.LittleEndian.Uint64(b[off:]) }

// area is an 8-aligned return area the host writes results into by
// address, read back through its bytes.
type area struct{ w [2]uint64 }

func (a *area) at() uint32 { return addr(&a.w[0]) }

func (a *area) bytes() []byte { return unsafe.Slice((*byte)(unsafe.Pointer(&a.w[0])), 16) }

// addr is the linear-memory address of a Go value (the wasm32 heap is below
// 4 GiB). The caller keeps the value alive across the call that uses it.
func addr[T any](p *T) uint32 { return uint32(uintptr(unsafe.Pointer(p))) }

// Arguments of the import call in progress. Storing them in a global makes
// them escape to the heap: a value on a goroutine stack could be moved by a
// stack growth while the host still holds its address (the host may call
// back into cabi_realloc, which runs Go code, during the import).
var pinned []any

func pin(v any) { pinned = append(pinned, v) }

// unpin ends an import call: its arguments are unpinned, and its results,
// read by now, are released from the arena.
func unpin() {
	clear(pinned)
	pinned = pinned[:0]
	release()
}

// validUTF8 replaces invalid UTF-8 by U+FFFD: a WIT string must be UTF-8,
// and the host traps the call when a lowered string is not, where Go
// strings may hold any bytes.
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

// strArg lowers a string to (ptr, len) of a heap copy pinned until unpin;
// invalid UTF-8 is replaced (see validUTF8).
func strArg(s string) (uint32, uint32) {
	if len(s) == 0 {
		return 1, 0
	}
	b := []byte(validUTF8(s))
	pin(b)
	return addr(&b[0]), uint32(len(b))
}

// bytesArg lowers a byte slice to (ptr, len), pinned until unpin.
func bytesArg(b []byte) (uint32, uint32) {
	if len(b) == 0 {
		return 1, 0
	}
	pin(b)
	return addr(&b[0]), uint32(len(b))
}
