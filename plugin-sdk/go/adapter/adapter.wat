;; A WASI preview1 adapter for Go's wasip1 runtime, in place of the
;; general reactor adapter (wasi-preview1-component-adapter-provider).
;;
;; Why not the general adapter: it allocates its state and stack on first
;; use, either through the main module's cabi_realloc (a Go export, which
;; traps when called before the Go runtime is initialised, and the first
;; WASI call, random_get, comes from inside runtime initialisation) or with
;; memory.grow (pages the Go runtime does not know about: its sbrk assumes
;; all memory above its break is its own, so its heap would later overlap
;; them). This adapter allocates nothing: it implements the functions Go's
;; runtime and os package import, with only a 64-byte scratch area for
;; return values at 0x1000, in the range Go's linker reserves below its
;; data for wasm_exec.js (unused on wasip1; the build checks that no data
;; segment starts below 0x2000).
;;
;; Semantics: no arguments, no environment, no preopened directories;
;; stdout and stderr are the component's (the host's) streams; clocks and
;; random come from wasi:clocks and wasi:random; poll_oneoff waits for the
;; first clock subscription only (enough for time.Sleep and timers);
;; proc_exit traps.
;;
;; One function is not WASI's: watchgate_arena_exhausted, a trap the Go
;; SDK's cabi_realloc raises when the host passes more than its arena
;; holds (Go code cannot trap without its runtime, which would print
;; through an import, forbidden at that point).
(module
  (import "env" "memory" (memory 0))
  (import "wasi:random/random@0.2.0" "get-random-u64" (func $random_u64 (result i64)))
  (import "wasi:clocks/monotonic-clock@0.2.0" "now" (func $mono_now (result i64)))
  (import "wasi:clocks/monotonic-clock@0.2.0" "subscribe-duration" (func $mono_sub (param i64) (result i32)))
  (import "wasi:clocks/wall-clock@0.2.0" "now" (func $wall_now (param i32)))
  (import "wasi:io/poll@0.2.0" "[method]pollable.block" (func $block (param i32)))
  (import "wasi:io/poll@0.2.0" "[resource-drop]pollable" (func $drop_pollable (param i32)))
  (import "wasi:io/error@0.2.0" "[resource-drop]error" (func $drop_error (param i32)))
  (import "wasi:io/streams@0.2.0" "[method]output-stream.blocking-write-and-flush"
    (func $write_flush (param i32 i32 i32 i32)))
  (import "wasi:cli/stdout@0.2.0" "get-stdout" (func $get_stdout (result i32)))
  (import "wasi:cli/stderr@0.2.0" "get-stderr" (func $get_stderr (result i32)))

  ;; errno values of wasi_snapshot_preview1
  (global $BADF i32 (i32.const 8))
  (global $INVAL i32 (i32.const 28))
  (global $IO i32 (i32.const 29))
  (global $NOTSUP i32 (i32.const 58))

  (global $SCRATCH i32 (i32.const 0x1000))
  ;; output-stream handles, fetched once (-1: not yet)
  (global $stdout (mut i32) (i32.const -1))
  (global $stderr (mut i32) (i32.const -1))

  (func (export "sched_yield") (result i32) (i32.const 0))

  (func (export "proc_exit") (param i32) unreachable)

  (func $watchgate_arena_exhausted (export "watchgate_arena_exhausted") unreachable)

  (func $zero2 (param $a i32) (param $b i32) (result i32)
    (i32.store (local.get $a) (i32.const 0))
    (i32.store (local.get $b) (i32.const 0))
    (i32.const 0))
  (func (export "args_sizes_get") (param i32 i32) (result i32)
    (call $zero2 (local.get 0) (local.get 1)))
  (func (export "environ_sizes_get") (param i32 i32) (result i32)
    (call $zero2 (local.get 0) (local.get 1)))
  (func (export "args_get") (param i32 i32) (result i32) (i32.const 0))
  (func (export "environ_get") (param i32 i32) (result i32) (i32.const 0))

  ;; Nanoseconds of clock $id: 0 realtime, 1 monotonic; -1 for others.
  (func $now (param $id i32) (result i64)
    (if (i32.eqz (local.get $id))
      (then
        (call $wall_now (global.get $SCRATCH))
        (return (i64.add
          (i64.mul (i64.load (global.get $SCRATCH)) (i64.const 1000000000))
          (i64.load32_u offset=8 (global.get $SCRATCH))))))
    (if (i32.eq (local.get $id) (i32.const 1))
      (then (return (call $mono_now))))
    (i64.const -1))

  (func (export "clock_time_get") (param $id i32) (param $precision i64) (param $out i32) (result i32)
    (local $t i64)
    (local.set $t (call $now (local.get $id)))
    (if (i64.eq (local.get $t) (i64.const -1))
      (then (return (global.get $NOTSUP))))
    (i64.store (local.get $out) (local.get $t))
    (i32.const 0))

  (func (export "random_get") (param $buf i32) (param $len i32) (result i32)
    (local $r i64)
    (block $done
      (loop $more
        (br_if $done (i32.lt_u (local.get $len) (i32.const 8)))
        (i64.store (local.get $buf) (call $random_u64))
        (local.set $buf (i32.add (local.get $buf) (i32.const 8)))
        (local.set $len (i32.sub (local.get $len) (i32.const 8)))
        (br $more)))
    (if (local.get $len)
      (then
        (local.set $r (call $random_u64))
        (loop $tail
          (i64.store8 (local.get $buf) (local.get $r))
          (local.set $r (i64.shr_u (local.get $r) (i64.const 8)))
          (local.set $buf (i32.add (local.get $buf) (i32.const 1)))
          (local.set $len (i32.sub (local.get $len) (i32.const 1)))
          (br_if $tail (local.get $len)))))
    (i32.const 0))

  ;; The output-stream for fd 1 or 2; -1 for any other fd.
  (func $stream (param $fd i32) (result i32)
    (if (i32.eq (local.get $fd) (i32.const 1))
      (then
        (if (i32.eq (global.get $stdout) (i32.const -1))
          (then (global.set $stdout (call $get_stdout))))
        (return (global.get $stdout))))
    (if (i32.eq (local.get $fd) (i32.const 2))
      (then
        (if (i32.eq (global.get $stderr) (i32.const -1))
          (then (global.set $stderr (call $get_stderr))))
        (return (global.get $stderr))))
    (i32.const -1))

  (func (export "fd_write") (param $fd i32) (param $iovs i32) (param $n i32) (param $nwritten i32) (result i32)
    (local $s i32) (local $buf i32) (local $len i32) (local $chunk i32) (local $total i32)
    (local.set $s (call $stream (local.get $fd)))
    (if (i32.eq (local.get $s) (i32.const -1))
      (then (return (global.get $BADF))))
    (block $iovs_done
      (loop $next_iov
        (br_if $iovs_done (i32.eqz (local.get $n)))
        (local.set $buf (i32.load (local.get $iovs)))
        (local.set $len (i32.load offset=4 (local.get $iovs)))
        (block $iov_done
          (loop $next_chunk
            (br_if $iov_done (i32.eqz (local.get $len)))
            ;; blocking-write-and-flush takes at most 4096 bytes a call
            (local.set $chunk
              (select (local.get $len) (i32.const 4096)
                (i32.lt_u (local.get $len) (i32.const 4096))))
            (call $write_flush (local.get $s) (local.get $buf) (local.get $chunk) (global.get $SCRATCH))
            (if (i32.load8_u (global.get $SCRATCH))
              (then
                ;; stream-error: last-operation-failed(error) holds a handle
                (if (i32.eqz (i32.load8_u offset=4 (global.get $SCRATCH)))
                  (then (call $drop_error (i32.load offset=8 (global.get $SCRATCH)))))
                (i32.store (local.get $nwritten) (local.get $total))
                (return (global.get $IO))))
            (local.set $buf (i32.add (local.get $buf) (local.get $chunk)))
            (local.set $len (i32.sub (local.get $len) (local.get $chunk)))
            (local.set $total (i32.add (local.get $total) (local.get $chunk)))
            (br $next_chunk)))
        (local.set $iovs (i32.add (local.get $iovs) (i32.const 8)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next_iov)))
    (i32.store (local.get $nwritten) (local.get $total))
    (i32.const 0))

  ;; Subscriptions are 48 bytes: userdata u64 @0, tag u8 @8, and for a
  ;; clock: id u32 @16, timeout u64 @24, precision u64 @32, flags u16 @40
  ;; (bit 0: absolute time). Events are 32 bytes: userdata u64 @0,
  ;; error u16 @8, type u8 @10.
  (func (export "poll_oneoff") (param $in i32) (param $out i32) (param $n i32) (param $nevents i32) (result i32)
    (local $timeout i64) (local $now i64) (local $p i32)
    (if (i32.eqz (local.get $n))
      (then (return (global.get $INVAL))))
    (block $found
      (loop $next
        (br_if $found (i32.eqz (i32.load8_u offset=8 (local.get $in))))
        (local.set $in (i32.add (local.get $in) (i32.const 48)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br_if $next (local.get $n))
        ;; no clock subscription: file descriptors cannot be polled here
        (return (global.get $NOTSUP))))
    (local.set $timeout (i64.load offset=24 (local.get $in)))
    (if (i32.and (i32.load16_u offset=40 (local.get $in)) (i32.const 1))
      (then
        (local.set $now (call $now (i32.load offset=16 (local.get $in))))
        (if (i64.eq (local.get $now) (i64.const -1))
          (then (return (global.get $NOTSUP))))
        (local.set $timeout
          (select (i64.sub (local.get $timeout) (local.get $now)) (i64.const 0)
            (i64.gt_u (local.get $timeout) (local.get $now))))))
    (local.set $p (call $mono_sub (local.get $timeout)))
    (call $block (local.get $p))
    (call $drop_pollable (local.get $p))
    (i64.store (local.get $out) (i64.load (local.get $in)))
    (i32.store16 offset=8 (local.get $out) (i32.const 0))
    (i32.store8 offset=10 (local.get $out) (i32.const 0))
    (i32.store (local.get $nevents) (i32.const 1))
    (i32.const 0))

  ;; Only stdin, stdout and stderr exist: character devices.
  (func (export "fd_fdstat_get") (param $fd i32) (param $out i32) (result i32)
    (if (i32.gt_u (local.get $fd) (i32.const 2))
      (then (return (global.get $BADF))))
    (i64.store (local.get $out) (i64.const 0))
    (i32.store8 (local.get $out) (i32.const 2))
    (i64.store offset=8 (local.get $out) (i64.const -1))
    (i64.store offset=16 (local.get $out) (i64.const 0))
    (i32.const 0))
  (func (export "fd_fdstat_set_flags") (param $fd i32) (param i32) (result i32)
    (select (global.get $NOTSUP) (global.get $BADF) (i32.le_u (local.get $fd) (i32.const 2))))
  (func (export "fd_close") (param $fd i32) (result i32)
    (select (i32.const 0) (global.get $BADF) (i32.le_u (local.get $fd) (i32.const 2))))
  ;; No preopened directories: EBADF ends Go's scan for them.
  (func (export "fd_prestat_get") (param i32 i32) (result i32) (global.get $BADF))
  (func (export "fd_prestat_dir_name") (param i32 i32 i32) (result i32) (global.get $BADF))
)
