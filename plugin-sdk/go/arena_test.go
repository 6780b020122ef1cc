package watchgate

import (
	"bytes"
	"testing"
)

// The arena's base is only a number here: addresses are base+offset.
const testBase = 0x10003

func TestArenaAlignsAndBumps(t *testing.T) {
	a := newArena(make([]byte, 64), testBase)
	p := a.alloc(0, 0, 1, 3)
	if p != testBase {
		t.Fatalf("first piece at %#x, want %#x", p, testBase)
	}
	q := a.alloc(0, 0, 8, 8)
	if q%8 != 0 || q < p+3 {
		t.Fatalf("8-aligned piece at %#x after %#x+3", q, p)
	}
	r := a.alloc(0, 0, 4, 4)
	if r%4 != 0 || r < q+8 {
		t.Fatalf("4-aligned piece at %#x after %#x+8", r, q)
	}
	if a.used != r+4-testBase {
		t.Fatalf("used %d, want %d", a.used, r+4-testBase)
	}
}

func TestArenaFullReturnsZeroAndKeepsState(t *testing.T) {
	a := newArena(make([]byte, 32), testBase)
	if a.alloc(0, 0, 1, 30) == 0 {
		t.Fatal("30 of 32 bytes refused")
	}
	used := a.used
	if p := a.alloc(0, 0, 1, 3); p != 0 {
		t.Fatalf("3 more bytes got %#x, want 0 (full)", p)
	}
	if p := a.alloc(0, 0, 8, 1); p != 0 {
		t.Fatalf("an aligned byte past the end got %#x", p)
	}
	if a.used != used {
		t.Fatalf("a refused piece changed used: %d, want %d", a.used, used)
	}
	if p := a.alloc(0, 0, 1, 0xFFFFFFFF); p != 0 {
		t.Fatalf("4 GiB got %#x", p)
	}
	a.reset()
	if a.alloc(0, 0, 1, 32) != testBase {
		t.Fatal("after reset the whole arena is not available")
	}
}

func TestArenaRefusesBadAlignment(t *testing.T) {
	a := newArena(make([]byte, 32), testBase)
	if p := a.alloc(0, 0, 3, 4); p != 0 {
		t.Fatalf("alignment 3 got %#x", p)
	}
	if p := a.alloc(0, 0, 0, 4); p != testBase {
		t.Fatalf("alignment 0 (as 1) got %#x", p)
	}
	if p := a.alloc(0, 0, 4, 0); p != 4 {
		t.Fatalf("an empty piece got %#x, want its alignment", p)
	}
}

func TestArenaReallocKeepsContents(t *testing.T) {
	a := newArena(make([]byte, 64), testBase)
	p := a.alloc(0, 0, 1, 4)
	b, _ := a.bytes(p, 4)
	copy(b, "abcd")
	// The last piece grows in place.
	if q := a.alloc(p, 4, 1, 8); q != p {
		t.Fatalf("last piece moved from %#x to %#x", p, q)
	}
	other := a.alloc(0, 0, 1, 2)
	// A piece that is not the last moves, with its contents.
	q := a.alloc(p, 8, 1, 16)
	if q == p || q < other+2 {
		t.Fatalf("moved piece at %#x (old %#x, other %#x)", q, p, other)
	}
	got, ok := a.bytes(q, 4)
	if !ok || !bytes.Equal(got, []byte("abcd")) {
		t.Fatalf("moved piece holds %q", got)
	}
	// Shrinking copies only the new size.
	r := a.alloc(q, 16, 1, 2)
	got, _ = a.bytes(r, 2)
	if !bytes.Equal(got, []byte("ab")) {
		t.Fatalf("shrunk piece holds %q", got)
	}
}

func TestArenaBytesBoundsChecked(t *testing.T) {
	a := newArena(make([]byte, 64), testBase)
	p := a.alloc(0, 0, 1, 10)
	if _, ok := a.bytes(p, 10); !ok {
		t.Fatal("a handed-out piece is unreadable")
	}
	for _, c := range []struct{ p, n uint32 }{
		{p, 11},             // past what was handed out
		{p - 1, 1},          // below the arena
		{p + 60, 1},         // in the buffer, never handed out
		{0xFFFFFFFF, 2},     // wraps
		{p + 5, 0xFFFFFFFF}, // wraps
	} {
		if _, ok := a.bytes(c.p, c.n); ok {
			t.Errorf("bytes(%#x, %d) allowed", c.p, c.n)
		}
	}
	a.reset()
	if _, ok := a.bytes(p, 1); ok {
		t.Error("a piece is readable after reset")
	}
}
