//! The plugin's `[settings]`: check and reload commands, the quiet window.

use std::time::Duration;

use crate::host::Host;

/// How many quiet windows `max_wait` is when unset.
const MAX_WAIT_FACTOR: u32 = 10;

/// The settings, read at every call (a sidecar change applies at once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `check`: granted command run on a candidate before it replaces an
    /// output file.
    pub check: Option<String>,
    /// `on_change`: granted command triggered after any output changed.
    pub on_change: Option<String>,
    /// `wait`: render only once the store has been quiet this long.
    pub wait: Option<Duration>,
    /// `max_wait`: render after this long even if changes keep coming.
    pub max_wait: Duration,
}

impl Config {
    /// Reads the settings through `host`.
    ///
    /// # Errors
    ///
    /// A setting that is empty or not a duration, naming it.
    pub fn load(host: &impl Host) -> Result<Self, String> {
        let name = |setting: &str| -> Result<Option<String>, String> {
            match host.setting(setting) {
                Some(v) if v.trim().is_empty() => Err(format!(
                    "setting {setting:?} is empty: name a granted command"
                )),
                v => Ok(v.map(|v| v.trim().to_owned())),
            }
        };
        let duration = |setting: &str| -> Result<Option<Duration>, String> {
            host.setting(setting)
                .map(|v| {
                    parse_duration(&v).ok_or_else(|| {
                        format!(
                            "setting {setting:?} = {v:?} is not a duration like \"500ms\" or \"2s\""
                        )
                    })
                })
                .transpose()
        };
        let wait = duration("wait")?.filter(|w| !w.is_zero());
        let max_wait = duration("max_wait")?
            .or(wait.map(|w| w * MAX_WAIT_FACTOR))
            .unwrap_or_default();
        if let Some(w) = wait
            && max_wait < w
        {
            return Err(format!(
                "setting \"max_wait\" ({max_wait:?}) is shorter than \"wait\" ({w:?})"
            ));
        }
        Ok(Self {
            check: name("check")?,
            on_change: name("on_change")?,
            wait,
            max_wait,
        })
    }
}

/// `500ms`, `2s`, `1.5s`, `1m`, or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "" | "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return None,
    };
    (0.0..86_400.0)
        .contains(&seconds)
        .then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("fast"), None);
        assert_eq!(parse_duration("5h"), None);
        assert_eq!(parse_duration(""), None);
    }
}
