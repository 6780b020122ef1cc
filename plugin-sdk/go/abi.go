//go:build wasip1

package watchgate

import "unsafe"

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
	retArea  [16]uint64
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

// bytesAt returns the n bytes at address p, which the host wrote into
// memory obtained from cabi_realloc (or which lies in the Go heap anyway).
func bytesAt(p, n uint32) []byte {
	if n == 0 {
		return nil
	}
	if b, ok := live[p]; ok && uint32(len(b)) >= n {
		return b[:n:n]
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(uintptr(p))), n)
}

func stringAt(p, n uint32) string {
	return string(bytesAt(p, n))
}

func u32At(p uint32) uint32 { return *(*uint32)(unsafe.Pointer(uintptr(p))) }
func u64At(p uint32) uint64 { return *(*uint64)(unsafe.Pointer(uintptr(p))) }
func u8At(p uint32) uint8   { return *(*uint8)(unsafe.Pointer(uintptr(p))) }

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

// strArg lowers a string to (ptr, len) of a heap copy pinned until unpin.
func strArg(s string) (uint32, uint32) {
	if len(s) == 0 {
		return 1, 0
	}
	b := []byte(s)
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
