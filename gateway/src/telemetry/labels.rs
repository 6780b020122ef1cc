//! The label sets and the named values metrics are keyed by: which source
//! or plugin, how a call ended, which per-plugin counter. Owns their names
//! as Prometheus shows them; it must not register or record anything.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

/// Label set naming one source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Source name.
    pub source: String,
}

/// Label set naming one plugin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// Plugin name.
    pub plugin: String,
}

/// Label set naming where a log line comes from: `source/NAME` or
/// `plugin/NAME`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    /// `source/NAME` or `plugin/NAME`.
    pub origin: String,
}

/// How one plugin call ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, serde::Serialize)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// The handler returned `Ok`.
    ok,
    /// The handler returned `Err`.
    error,
    /// The guest trapped (panic, unreachable, stack overflow, …).
    trap,
    /// The wall-clock deadline interrupted the call.
    timeout,
    /// The fuel budget ran out.
    out_of_fuel,
    /// The guest hit its memory cap.
    memory,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ok => "ok",
            Outcome::error => "error",
            Outcome::trap => "trap",
            Outcome::timeout => "timeout",
            Outcome::out_of_fuel => "out_of_fuel",
            Outcome::memory => "memory",
        }
    }
}

/// Every outcome, in a fixed order: per-plugin counters are arrays indexed
/// by it, with `ok` first.
pub const OUTCOMES: [Outcome; 6] = [
    Outcome::ok,
    Outcome::error,
    Outcome::trap,
    Outcome::timeout,
    Outcome::out_of_fuel,
    Outcome::memory,
];

/// The per-plugin counters that count one occurrence at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginCounter {
    /// A version loaded.
    Load,
    /// A file rejected.
    LoadFailure,
    /// A fresh instance made (first call, or after a trap).
    Instantiation,
    /// A call retried.
    Retry,
    /// An event kept as a dead letter.
    DeadLetter,
    /// A log line dropped by the plugin's log budget.
    LogLineDropped,
    /// A WASI wait cut off at its call's deadline.
    WaitCutOff,
    /// A dead letter dropped to keep the plugin's dead letters within
    /// their count and byte caps.
    DeadLetterDropped,
    /// A plugin-supplied string (an error message, a log line) cut to the
    /// host's bound.
    TextTruncated,
    /// A panic of the gateway's own code while it ran the plugin.
    HostPanic,
}

/// Where the gateway's own code panicked while it ran a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicSite {
    /// Inside one call (an import, lowering or lifting): the call failed
    /// as a trap and the instance was replaced.
    Call,
    /// In the worker's round outside any call: the worker stopped.
    Round,
}

/// Labels of a plugin call outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Plugin name.
    pub plugin: String,
    /// How the call ended.
    pub outcome: Outcome,
}

/// Labels of a capability call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapabilityLabels {
    /// Plugin name.
    pub plugin: String,
    /// Capability (`files`, `state`, …).
    pub capability: String,
    /// `ok`, `error` or `denied`.
    pub outcome: String,
}

/// Labels of a plugin file refused by a compile limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompileRefusalLabels {
    /// Plugin name.
    pub plugin: String,
    /// The `[runtime]` key of the limit (`max_plugin_functions`, …).
    pub limit: String,
}

/// Labels of a granted command: bounded, since the operator's grant names
/// the commands.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// Plugin name.
    pub plugin: String,
    /// The command's name in the plugin's `[grants] commands`.
    pub command: String,
}
