//go:build wasip1

package watchgate

import "unsafe"

// Size and alignment of `event` in linear memory (canonical ABI): source
// @0, kind @8, key @12, value @20, prev-value @32, revision @48, resync @56,
// coalesced @60, metadata @64; 72 bytes, align 8.
const eventSize = 72

func optBytes(disc, p, n uint32) ([]byte, bool) {
	if disc == 0 {
		return nil, false
	}
	return append([]byte(nil), bytesAt(p, n)...), true
}

func metadataAt(p, n uint32) [][2]string {
	if n == 0 {
		return nil
	}
	out := make([][2]string, n)
	for i := range n {
		el := p + i*16
		out[i] = [2]string{stringAt(u32At(el), u32At(el+4)), stringAt(u32At(el+8), u32At(el+12))}
	}
	return out
}

func eventAt(p uint32) Event {
	e := Event{
		Source:    stringAt(u32At(p), u32At(p+4)),
		Kind:      EventKind(u8At(p + 8)),
		Key:       stringAt(u32At(p+12), u32At(p+16)),
		Revision:  u64At(p + 48),
		Resync:    u8At(p+56) != 0,
		Coalesced: u32At(p + 60),
		Metadata:  metadataAt(u32At(p+64), u32At(p+68)),
	}
	e.Value, e.HasValue = optBytes(uint32(u8At(p+20)), u32At(p+24), u32At(p+28))
	e.PrevValue, e.HasPrevValue = optBytes(uint32(u8At(p+32)), u32At(p+36), u32At(p+40))
	return e
}

// setErr writes a result<_, string>-shaped error into the return area.
func setErr(off uintptr, msg string) {
	retBytes = []byte(msg)
	base := unsafe.Pointer(&retArea[0])
	var p uint32 = 1
	if len(retBytes) > 0 {
		p = addr(&retBytes[0])
	}
	*(*uint32)(unsafe.Add(base, off)) = p
	*(*uint32)(unsafe.Add(base, off+4)) = uint32(len(retBytes))
}

// callHandle runs the plugin's handler. A panic is not recovered: it traps
// the instance, as a Rust panic does, and the host replaces it.
func callHandle(e Event) error {
	if handler == nil {
		panic("watchgate: no handler registered (call watchgate.Register from init)")
	}
	return handler.Handle(e)
}

// The 16 flat parameters of `event` (canonical ABI flattening; 16 is the
// limit before the record would be passed by pointer).
//
//go:wasmexport handle
func exportHandle(srcP, srcN, kind, keyP, keyN, valD, valP, valN, prevD, prevP, prevN uint32, revision uint64, resync, coalesced, mdP, mdN uint32) uint32 {
	defer release()
	e := Event{
		Source:    stringAt(srcP, srcN),
		Kind:      EventKind(kind),
		Key:       stringAt(keyP, keyN),
		Revision:  revision,
		Resync:    resync != 0,
		Coalesced: coalesced,
		Metadata:  metadataAt(mdP, mdN),
	}
	e.Value, e.HasValue = optBytes(valD, valP, valN)
	e.PrevValue, e.HasPrevValue = optBytes(prevD, prevP, prevN)
	retArea = [16]uint64{}
	retBytes = nil
	if err := callHandle(e); err != nil {
		*(*uint8)(unsafe.Pointer(&retArea[0])) = 1
		setErr(4, err.Error())
	}
	return addr(&retArea[0])
}

//go:wasmexport handle-batch
func exportHandleBatch(listP, listN uint32) uint32 {
	defer release()
	events := make([]Event, listN)
	for i := range listN {
		events[i] = eventAt(listP + i*eventSize)
	}
	retArea = [16]uint64{}
	retBytes = nil
	var idx int
	var err error
	if bh, ok := handler.(BatchHandler); ok {
		idx, err = bh.HandleBatch(events)
	} else {
		for i, e := range events {
			if err = callHandle(e); err != nil {
				idx = i
				break
			}
		}
	}
	if err != nil {
		base := unsafe.Pointer(&retArea[0])
		*(*uint8)(base) = 1
		*(*uint32)(unsafe.Add(base, 4)) = uint32(idx)
		setErr(8, err.Error())
	}
	return addr(&retArea[0])
}
