//! Background threads: work that must not take a core from the threads
//! that deliver events and call plugins (the state writer, plugin
//! compiles) runs at a lower priority. Owns how a thread lowers its own
//! priority; each caller decides by how much.

/// Lower the calling thread's priority by `nice` steps (at most to 19).
/// With a nice value 10 above the rest of the gateway, a thread gets about
/// a tenth of their share of a contended core, and all of an idle one. On
/// Linux the nice value of a thread ID applies to that thread alone;
/// elsewhere this does nothing. A failure is logged at debug level, naming
/// `what`: the thread then runs at the normal priority.
pub fn lower_this_thread(nice: i32, what: &str) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        let result =
            getpriority_process(me).and_then(|now| setpriority_process(me, (now + nice).min(19)));
        if let Err(e) = result {
            tracing::debug!(error = %e, thread = what, "Could not lower a background thread's priority.");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (nice, what);
}
