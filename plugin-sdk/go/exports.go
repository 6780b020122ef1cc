//go:build wasip1

package watchgate

import "encoding/binary"

// Size and alignment of `event` in linear memory (canonical ABI): source
// @0, kind @8, key @12, value @20, prev-value @32, revision @48, resync @56,
// coalesced @60, metadata @64; 72 bytes, align 8.
const eventSize = 72

func optBytes(disc, p, n uint32) ([]byte, bool) {
	if disc == 0 {
		return nil, false
	}
	return append([]byte(nil), mem(p, n)...), true
}

// metadataAt reads list<tuple<string, string>>: 16 bytes per element.
func metadataAt(p, n uint32) [][2]string {
	if n == 0 {
		return nil
	}
	els := mem(p, n*16)
	out := make([][2]string, n)
	for i := range n {
		o := i * 16
		out[i] = [2]string{
			stringAt(le32(els, o), le32(els, o+4)),
			stringAt(le32(els, o+8), le32(els, o+12)),
		}
	}
	return out
}

// eventAt reads one `event` of a list from its eventSize bytes.
func eventAt(b []byte) Event {
	e := Event{
		Source:    stringAt(le32(b, 0), le32(b, 4)),
		Kind:      EventKind(b[8]),
		Key:       stringAt(le32(b, 12), le32(b, 16)),
		Revision:  le64(b, 48),
		Resync:    b[56] != 0,
		Coalesced: le32(b, 60),
		Metadata:  metadataAt(le32(b, 64), le32(b, 68)),
	}
	e.Value, e.HasValue = optBytes(uint32(b[20]), le32(b, 24), le32(b, 28))
	e.PrevValue, e.HasPrevValue = optBytes(uint32(b[32]), le32(b, 36), le32(b, 40))
	return e
}

// setErr writes an error's text (a string at offset off) into the return
// area; invalid UTF-8 is replaced, so the call fails with an error rather
// than a trap.
func setErr(off uint32, msg string) {
	retBytes = []byte(validUTF8(msg))
	var p uint32 = 1
	if len(retBytes) > 0 {
		p = addr(&retBytes[0])
	}
	b := retArea.bytes()
	binary.LittleEndian.PutUint32(b[off:], p)
	binary.LittleEndian.PutUint32(b[off+4:], uint32(len(retBytes)))
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
	release() // copied: the handler's import calls get the whole arena
	retArea = area{}
	retBytes = nil
	if err := callHandle(e); err != nil {
		retArea.bytes()[0] = 1
		setErr(4, err.Error())
	}
	return retArea.at()
}

//go:wasmexport handle-batch
func exportHandleBatch(listP, listN uint32) uint32 {
	defer release()
	list := mem(listP, listN*eventSize)
	events := make([]Event, listN)
	for i := range listN {
		events[i] = eventAt(list[i*eventSize : (i+1)*eventSize])
	}
	release() // copied: the handler's import calls get the whole arena
	retArea = area{}
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
		b := retArea.bytes()
		b[0] = 1
		binary.LittleEndian.PutUint32(b[4:], uint32(idx))
		setErr(8, err.Error())
	}
	return retArea.at()
}
