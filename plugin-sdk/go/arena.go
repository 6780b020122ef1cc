package watchgate

// The arena: memory the host writes into through cabi_realloc.
//
// The host calls cabi_realloc while it lowers an export's arguments (the
// event, a batch) and an import's results (a state value, a snapshot
// scan) into linear memory, and the component model forbids the guest to
// call any import meanwhile: wasmtime traps with "cannot leave component
// instance". Go's allocator can call one at any allocation (a heap growth
// or a collection reads the clock, a collection may switch goroutines and
// poll), so cabi_realloc must not allocate. It hands out slices of an
// arena reserved beforehand instead, by bumping an offset: no call, no
// allocation, no loop.
//
// What the host writes is copied into Go memory as soon as it is read, so
// the arena is emptied (reset) after an export has decoded its arguments,
// after each import's results are read, and when an export returns. It
// must hold one piece at a time: all the arguments of one export call, or
// all the results of one import call.

// arena hands out aligned pieces of buf, which starts at address base.
// Addresses are what the host sees (uint32 offsets into linear memory);
// buf[i] is at base+i.
type arena struct {
	buf  []byte
	base uint32
	used uint32 // bytes of buf handed out since the last reset
	last uint32 // offset of the last piece handed out (for realloc in place)
}

func newArena(buf []byte, base uint32) arena {
	return arena{buf: buf, base: base}
}

// alloc is cabi_realloc's work: newSize bytes aligned to align, holding
// the first min(oldSize, newSize) bytes of the piece at oldPtr (0: none).
// It returns the piece's address, or 0 when it does not fit (or align is
// not a power of two), and never allocates or calls a function that
// could. A size of 0 gets align, a non-null address nobody reads.
//
//go:nosplit
func (a *arena) alloc(oldPtr, oldSize, align, newSize uint32) uint32 {
	if align == 0 {
		align = 1
	}
	if align&(align-1) != 0 {
		return 0
	}
	if newSize == 0 {
		return align
	}
	size := uint64(len(a.buf))
	base := uint64(a.base)
	// The last piece grows or shrinks in place.
	if oldPtr != 0 && a.used > 0 && uint64(oldPtr) == base+uint64(a.last) &&
		uint64(oldPtr)&uint64(align-1) == 0 && uint64(a.last)+uint64(newSize) <= size {
		a.used = a.last + newSize
		return oldPtr
	}
	start := (base + uint64(a.used) + uint64(align) - 1) &^ (uint64(align) - 1)
	end := start + uint64(newSize)
	if end > base+size {
		return 0
	}
	off := uint32(start - base)
	if oldPtr != 0 && oldSize != 0 {
		// Only a piece of this arena is copied from.
		if o := uint64(oldPtr); o >= base && o+uint64(oldSize) <= base+uint64(a.used) {
			n := min(oldSize, newSize)
			from := uint32(o - base)
			copy(a.buf[off:off+n], a.buf[from:from+n])
		}
	}
	a.last = off
	a.used = uint32(end - base)
	return uint32(start)
}

// bytes returns the n bytes at address p, which must lie in what was
// handed out since the last reset.
func (a *arena) bytes(p, n uint32) ([]byte, bool) {
	if p < a.base || uint64(p)+uint64(n) > uint64(a.base)+uint64(a.used) {
		return nil, false
	}
	off := p - a.base
	return a.buf[off : off+n : off+n], true
}

// reset forgets every piece: the host's data has been read.
func (a *arena) reset() {
	a.used = 0
	a.last = 0
}
