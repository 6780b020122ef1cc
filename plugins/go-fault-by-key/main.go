// Command go-fault-by-key is a test fixture for Go plugins: the key of
// each event picks what the handler does, so one plugin exercises the
// host's handling of Go's runtime (traps, loops, memory, the collector,
// timers, stdout) and the SDK's host calls.
//
//	panic    panic (traps the instance)
//	spin     loop forever (stopped by fuel or the deadline)
//	alloc    allocate 1 MiB blocks and keep them until memory is refused
//	error    return an error naming the value
//	state    increment the state counter "count" and log its new value
//	settings log the setting named by the value
//	stdout   print the value to stdout
//	sleep    time.Sleep for the value in milliseconds, log the elapsed time
//	gc       allocate about 64 MiB in total (kept 1 MiB at a time) with a
//	         state read per block, run the collector, and check that the
//	         strings read from the host survived it
//	goroutines  sum 1..1000 in 4 goroutines joined by a channel, log it
//	deadlock receive from a channel nobody sends on
//	badutf8  log a line and return an error, both with invalid UTF-8
//	replace  replace replaced.txt in the files grant with the value
//	http     POST the value to http://hooks.test:8080/x with two headers
//	kv       put the value at /app/status/x in source etcd, then delete
//	         /app/status/y
//	snapshot log the snapshot's value of app/port and the keys under app/
//	arena    watchgate.ReserveArena(value MiB), log "arena <value> MiB"
//	anything else: nothing
//
// A handle-batch call logs "batch <n>: <key>=<value>/<revision> ..." (so a
// test can see batches arrive and decode; a value over 32 bytes is logged
// as "<N bytes>") and then handles each event in order.
package main

import (
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"time"

	"watchgate.dev/sdk"
)

type faults struct{}

var kept [][]byte

func (faults) Handle(e watchgate.Event) error {
	switch e.Key {
	case "panic":
		panic("go-fault-by-key: panic requested")
	case "spin":
		for n := 0; ; n++ {
			if n < 0 {
				break
			}
		}
	case "alloc":
		for {
			kept = append(kept, make([]byte, 1<<20))
			kept[len(kept)-1][0] = 1
		}
	case "error":
		return errors.New("go-fault-by-key: error requested: " + string(e.Value))
	case "state":
		n := 0
		if v, ok := watchgate.StateGet("count"); ok {
			n, _ = strconv.Atoi(string(v))
		}
		n++
		if err := watchgate.StateSet("count", []byte(strconv.Itoa(n))); err != nil {
			return err
		}
		watchgate.Log(watchgate.Info, "count="+strconv.Itoa(n))
	case "settings":
		v, ok := watchgate.Setting(string(e.Value))
		watchgate.Log(watchgate.Info, fmt.Sprintf("setting %s=%q set=%v", e.Value, v, ok))
	case "goroutines":
		results := make(chan int)
		for w := range 4 {
			go func() {
				sum := 0
				for i := w + 1; i <= 1000; i += 4 {
					sum += i
				}
				results <- sum
			}()
		}
		total := 0
		for range 4 {
			total += <-results
		}
		watchgate.Log(watchgate.Info, fmt.Sprintf("goroutines sum %d", total))
	case "deadlock":
		<-make(chan int)
	case "badutf8":
		watchgate.Log(watchgate.Info, "bad \xff line")
		return errors.New("bad \xff error")
	case "replace":
		return watchgate.FilesReplace("replaced.txt", e.Value)
	case "http":
		id, err := watchgate.HTTPSend(watchgate.Request{
			Method:  "POST",
			URL:     "http://hooks.test:8080/x",
			Headers: [][2]string{{"content-type", "text/plain"}, {"x-go", "1"}},
			Body:    e.Value,
		})
		if err != nil {
			return err
		}
		watchgate.Log(watchgate.Info, fmt.Sprintf("http id %d", id))
	case "kv":
		if err := watchgate.KVPut("etcd", "/app/status/x", e.Value); err != nil {
			return err
		}
		return watchgate.KVDelete("etcd", "/app/status/y")
	case "snapshot":
		v, ok, err := watchgate.SnapshotGet(e.Source, "app/port")
		if err != nil {
			return err
		}
		entries, err := watchgate.SnapshotScan(e.Source, "app/")
		if err != nil {
			return err
		}
		desc := fmt.Sprintf("snapshot app/port=%q present=%v scan:", v, ok)
		for _, en := range entries {
			desc += fmt.Sprintf(" %s=%q", en.Key, en.Value)
		}
		watchgate.Log(watchgate.Info, desc)
	case "arena":
		mib, err := strconv.Atoi(strings.TrimSpace(string(e.Value)))
		if err != nil {
			return err
		}
		watchgate.ReserveArena(mib << 20)
		watchgate.Log(watchgate.Info, fmt.Sprintf("arena %d MiB", mib))
	case "stdout":
		fmt.Println(string(e.Value))
	case "sleep":
		ms, _ := strconv.Atoi(strings.TrimSpace(string(e.Value)))
		start := time.Now()
		time.Sleep(time.Duration(ms) * time.Millisecond)
		watchgate.Log(watchgate.Info, fmt.Sprintf("slept %d ms", time.Since(start).Milliseconds()))
	case "gc":
		if err := watchgate.StateSet("gc-probe", []byte("0123456789abcdef")); err != nil {
			return err
		}
		var got []string
		for i := range 64 {
			block := make([]byte, 1<<20)
			block[i] = byte(i)
			v, _ := watchgate.StateGet("gc-probe")
			got = append(got, string(v))
			_ = block
		}
		runtime.GC()
		for i, v := range got {
			if v != "0123456789abcdef" {
				return fmt.Errorf("go-fault-by-key: state read %d corrupted after GC: %q", i, v)
			}
		}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		watchgate.Log(watchgate.Info, fmt.Sprintf("gc ok: %d collections, heap %d KiB", ms.NumGC, ms.HeapAlloc>>10))
	}
	return nil
}

func (f faults) HandleBatch(events []watchgate.Event) (int, error) {
	desc := fmt.Sprintf("batch %d:", len(events))
	for _, e := range events {
		v := string(e.Value)
		if len(v) > 32 {
			v = fmt.Sprintf("<%d bytes>", len(v))
		}
		desc += fmt.Sprintf(" %s=%s/%d", e.Key, v, e.Revision)
	}
	watchgate.Log(watchgate.Info, desc)
	for i, e := range events {
		if err := f.Handle(e); err != nil {
			return i, err
		}
	}
	return 0, nil
}

func init() { watchgate.Register(faults{}) }

func main() {}
