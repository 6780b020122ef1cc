//! Plugin-supplied text as the host keeps it: one bound for every string a
//! guest hands the host that ends up in a log line, a report or the state
//! store.
//!
//! A plugin decides how long its error messages and log lines are; the host
//! decides how much of them it keeps. [`clip`] is applied once, where such a
//! string enters the host (a call's error, a log line, a rejected file's
//! reason, what a capability logs of a request), so nothing downstream (the
//! gateway log, `/v1/plugins`, dead letters) holds more than
//! [`MAX_TEXT`] bytes of it. This module must not log or count: the caller
//! knows the plugin and counts the cut in
//! `watchgate_plugin_text_truncated_total`.

use std::borrow::Cow;

/// Most bytes of one plugin-supplied string the host keeps; the rest is
/// replaced by a marker saying how long the string was.
pub const MAX_TEXT: usize = 4096;

/// `text` whole when it fits in [`MAX_TEXT`] bytes; otherwise its first
/// [`MAX_TEXT`] bytes (fewer, to end on a UTF-8 character boundary)
/// followed by `… [truncated: N bytes, limit 4096]`.
pub fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_TEXT {
        return Cow::Borrowed(text);
    }
    let cut = text.floor_char_boundary(MAX_TEXT);
    Cow::Owned(format!(
        "{}… [truncated: {} bytes, limit {MAX_TEXT}]",
        &text[..cut],
        text.len()
    ))
}

/// [`clip`] of an owned string, and whether it was cut. The string is
/// kept (not copied) when it fits.
pub fn clip_owned(text: String) -> (String, bool) {
    match clip(&text) {
        Cow::Borrowed(_) => (text, false),
        Cow::Owned(cut) => (cut, true),
    }
}

/// A size for people: bytes below 1 KiB, else KiB, MiB or GiB with one
/// decimal.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_within_the_bound_is_kept_whole() {
        let text = "x".repeat(MAX_TEXT);
        assert!(matches!(clip(&text), Cow::Borrowed(t) if t == text));
        assert_eq!(clip_owned(text.clone()), (text, false));
        assert_eq!(clip(""), "");
    }

    #[test]
    fn longer_text_is_cut_with_a_marker_naming_its_length_and_the_limit() {
        let text = "y".repeat(50 << 20);
        let (cut, truncated) = clip_owned(text);
        assert!(truncated);
        let marker = format!("… [truncated: {} bytes, limit 4096]", 50 << 20);
        assert_eq!(cut.len(), MAX_TEXT + marker.len());
        assert!(cut.starts_with(&"y".repeat(MAX_TEXT)));
        assert!(cut.ends_with(&marker), "{}", &cut[MAX_TEXT - 8..]);
    }

    #[test]
    fn the_cut_falls_on_a_character_boundary() {
        // Three-byte characters: the bound falls inside one of them.
        let text = "€".repeat(MAX_TEXT);
        let cut = clip(&text);
        let kept = cut.split('…').next().unwrap();
        assert!(kept.len() <= MAX_TEXT && kept.len() > MAX_TEXT - 3);
        assert!(kept.chars().all(|c| c == '€'), "a character was split");
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(75_615), "73.8 KiB");
        assert_eq!(human_bytes(19_460_757), "18.6 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
