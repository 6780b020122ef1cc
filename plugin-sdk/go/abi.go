//go:build wasip1

package watchgate

import (
	"encoding/binary"
	"strings"
	"unicode/utf8"
	"unsafe"
)

// Memory handed to the host through cabi_realloc (export arguments, import
// results) must stay reachable for the Go collector until the Go side has
// read it; the host only holds integer addresses, which the collector does
// not see. Every allocation is kept here, by address, until the export call
// that caused it has returned. The Go heap does not move objects, so an
// address stays valid while the slice is referenced.
var live = map[uint32][]byte{}

// Memory that must outlive the current call: the return area and the error
// text of the last export, read by the host after the export returns.
var (
	retArea  area
	retBytes []byte
)

//go:wasmexport cabi_realloc
func cabiRealloc(oldPtr, oldSize, align, newSize uint32) uint32 {
	if newSize == 0 {
		return align
	}
	if align < 1 {
		align = 1
	}
	// Over-allocate so the start can be aligned for any align up to the
	// buffer's own (Go aligns byte slices only by their size class).
	buf := make([]byte, newSize+align)
	base := uint32(uintptr(unsafe.Pointer(&buf[0])))
	start := (base + align - 1) &^ (align - 1)
	buf = buf[start-base : start-base+newSize]
	if oldPtr != 0 {
		if old, ok := live[oldPtr]; ok {
			copy(buf, old[:min(oldSize, uint32(len(old)))])
			delete(live, oldPtr)
		}
	}
	live[start] = buf
	return start
}

// release forgets every allocation made for the call that just finished.
func release() {
	clear(live)
}

// mem returns the n bytes the host wrote at address p. Every list and
// string the host passes in (export arguments, import results) lives in
// its own cabi_realloc allocation starting at p, so the bytes are read
// through that Go slice, bounds-checked, never through a raw address.
func mem(p, n uint32) []byte {
	if n == 0 {
		return nil
	}
	b, ok := live[p]
	if !ok || uint32(len(b)) < n {
		panic("watchgate: the host passed memory not allocated by cabi_realloc")
	}
	return b[:n:n]
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

func unpin() { clear(pinned); pinned = pinned[:0] }

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
