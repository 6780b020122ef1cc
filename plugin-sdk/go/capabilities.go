//go:build wasip1

package watchgate

import "errors"

// Imports of the host interfaces, lowered by hand (canonical ABI). Every
// function whose results flatten to more than one value takes a pointer to
// a return area as its last parameter.

//go:wasmimport watchgate:plugin/log@0.1.0 log
func wgLog(level, msgP, msgN uint32)

//go:wasmimport watchgate:plugin/state@0.1.0 get
func wgStateGet(keyP, keyN, ret uint32)

//go:wasmimport watchgate:plugin/state@0.1.0 set
func wgStateSet(keyP, keyN, valD, valP, valN, ret uint32)

//go:wasmimport watchgate:plugin/settings@0.1.0 get
func wgSettingsGet(nameP, nameN, ret uint32)

//go:wasmimport watchgate:plugin/files@0.1.0 append
func wgFilesAppend(pathP, pathN, dataP, dataN, ret uint32)

//go:wasmimport watchgate:plugin/files@0.1.0 replace
func wgFilesReplace(pathP, pathN, dataP, dataN, ret uint32)

//go:wasmimport watchgate:plugin/http@0.1.0 send
func wgHTTPSend(methodP, methodN, urlP, urlN, hdrP, hdrN, bodyD, bodyP, bodyN, ret uint32)

//go:wasmimport watchgate:plugin/kv@0.1.0 put
func wgKVPut(srcP, srcN, keyP, keyN, valP, valN, ret uint32)

//go:wasmimport watchgate:plugin/kv@0.1.0 delete
func wgKVDelete(srcP, srcN, keyP, keyN, ret uint32)

//go:wasmimport watchgate:plugin/snapshot@0.1.0 get
func wgSnapshotGet(srcP, srcN, keyP, keyN, ret uint32)

//go:wasmimport watchgate:plugin/snapshot@0.1.0 scan
func wgSnapshotScan(srcP, srcN, prefP, prefN, ret uint32)

// Level is the severity of a log line.
type Level uint32

const (
	Trace Level = iota
	Debug
	Info
	Warn
	Error
)

// importRet is the return area of an import call (16 bytes, 8-aligned,
// enough for every result in the world). It is a global so that it lives
// in the heap, not on a stack that could move; import calls never nest.
var importRet area

type ret struct{ a *area }

func newRet() ret {
	importRet = area{}
	return ret{&importRet}
}

func (r ret) at() uint32            { return r.a.at() }
func (r ret) u8(off uint32) uint8   { return r.a.bytes()[off] }
func (r ret) u32(off uint32) uint32 { return le32(r.a.bytes(), off) }
func (r ret) u64(off uint32) uint64 { return le64(r.a.bytes(), off) }

// unitResult reads result<_, string>.
func (r ret) unitResult() error {
	if r.u8(0) == 0 {
		return nil
	}
	return errors.New(stringAt(r.u32(4), r.u32(8)))
}

// Log writes one line into the gateway's log (rate limited per plugin).
func Log(level Level, msg string) {
	defer unpin()
	p, n := strArg(msg)
	wgLog(uint32(level), p, n)
}

// StateGet reads a value of the plugin's host-kept state.
func StateGet(key string) ([]byte, bool) {
	r := newRet()
	defer unpin()
	kp, kn := strArg(key)
	wgStateGet(kp, kn, r.at())
	if r.u8(0) == 0 {
		return nil, false
	}
	return append([]byte(nil), mem(r.u32(4), r.u32(8))...), true
}

// StateSet sets a value of the plugin's state.
func StateSet(key string, value []byte) error {
	return stateSet(key, 1, value)
}

// StateDelete removes a key of the plugin's state.
func StateDelete(key string) error {
	return stateSet(key, 0, nil)
}

func stateSet(key string, disc uint32, value []byte) error {
	r := newRet()
	defer unpin()
	kp, kn := strArg(key)
	vp, vn := bytesArg(value)
	wgStateSet(kp, kn, disc, vp, vn, r.at())
	return r.unitResult()
}

// Setting returns the operator's setting name from the sidecar's [settings].
func Setting(name string) (string, bool) {
	r := newRet()
	defer unpin()
	np, nn := strArg(name)
	wgSettingsGet(np, nn, r.at())
	if r.u8(0) == 0 {
		return "", false
	}
	return stringAt(r.u32(4), r.u32(8)), true
}

// FilesAppend appends data to path in the files grant.
func FilesAppend(path string, data []byte) error {
	r := newRet()
	defer unpin()
	pp, pn := strArg(path)
	dp, dn := bytesArg(data)
	wgFilesAppend(pp, pn, dp, dn, r.at())
	return r.unitResult()
}

// FilesReplace replaces the contents of path in the files grant atomically.
func FilesReplace(path string, data []byte) error {
	r := newRet()
	defer unpin()
	pp, pn := strArg(path)
	dp, dn := bytesArg(data)
	wgFilesReplace(pp, pn, dp, dn, r.at())
	return r.unitResult()
}

// Request is one outbound HTTP request.
type Request struct {
	Method  string
	URL     string
	Headers [][2]string
	Body    []byte // nil: no body
}

// HTTPSend queues a request to a granted host and returns its id.
func HTTPSend(req Request) (uint64, error) {
	r := newRet()
	defer unpin()
	mp, mn := strArg(req.Method)
	up, un := strArg(req.URL)
	// list<tuple<string, string>>: 16 bytes per element, align 4.
	hdr := make([]uint32, 4*len(req.Headers))
	for i, h := range req.Headers {
		np, nn := strArg(h[0])
		vp, vn := strArg(h[1])
		hdr[4*i], hdr[4*i+1], hdr[4*i+2], hdr[4*i+3] = np, nn, vp, vn
	}
	var hp uint32 = 4
	if len(hdr) > 0 {
		pin(hdr)
		hp = addr(&hdr[0])
	}
	var bd uint32
	bp, bn := bytesArg(req.Body)
	if req.Body != nil {
		bd = 1
	}
	wgHTTPSend(mp, mn, up, un, hp, uint32(len(req.Headers)), bd, bp, bn, r.at())
	if r.u8(0) != 0 {
		return 0, errors.New(stringAt(r.u32(8), r.u32(12)))
	}
	return r.u64(8), nil
}

// KVPut queues a put of key in an etcd source, under a granted prefix.
func KVPut(source, key string, value []byte) error {
	r := newRet()
	defer unpin()
	sp, sn := strArg(source)
	kp, kn := strArg(key)
	vp, vn := bytesArg(value)
	wgKVPut(sp, sn, kp, kn, vp, vn, r.at())
	return r.unitResult()
}

// KVDelete queues a delete of key in an etcd source.
func KVDelete(source, key string) error {
	r := newRet()
	defer unpin()
	sp, sn := strArg(source)
	kp, kn := strArg(key)
	wgKVDelete(sp, sn, kp, kn, r.at())
	return r.unitResult()
}

// SnapshotGet reads the gateway's current value of key.
func SnapshotGet(source, key string) ([]byte, bool, error) {
	r := newRet()
	defer unpin()
	sp, sn := strArg(source)
	kp, kn := strArg(key)
	wgSnapshotGet(sp, sn, kp, kn, r.at())
	if r.u8(0) != 0 {
		return nil, false, errors.New(stringAt(r.u32(4), r.u32(8)))
	}
	if r.u8(4) == 0 {
		return nil, false, nil
	}
	return append([]byte(nil), mem(r.u32(8), r.u32(12))...), true, nil
}

// Entry is one key and value of a snapshot scan.
type Entry struct {
	Key   string
	Value []byte
}

// SnapshotScan returns every present key under prefix, in key order.
func SnapshotScan(source, prefix string) ([]Entry, error) {
	r := newRet()
	defer unpin()
	sp, sn := strArg(source)
	pp, pn := strArg(prefix)
	wgSnapshotScan(sp, sn, pp, pn, r.at())
	if r.u8(0) != 0 {
		return nil, errors.New(stringAt(r.u32(4), r.u32(8)))
	}
	n := r.u32(8)
	els := mem(r.u32(4), n*16)
	out := make([]Entry, n)
	for i := range n {
		o := i * 16
		out[i] = Entry{
			Key:   stringAt(le32(els, o), le32(els, o+4)),
			Value: append([]byte(nil), mem(le32(els, o+8), le32(els, o+12))...),
		}
	}
	return out, nil
}
