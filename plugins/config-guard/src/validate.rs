//! Settings and validation of one value.
//!
//! Pure Rust with no host calls, so it is unit-tested natively. It owns
//! which format a key is checked as and what counts as valid: the value is
//! UTF-8 and parses as that format. It must not log or keep state.

use std::fmt;

use saphyr::{LoadableYamlNode as _, Yaml};

/// A concrete format a value is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON (RFC 8259), one value, nothing after it.
    Json,
    /// YAML 1.2, any number of documents.
    Yaml,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Json => "JSON",
            Self::Yaml => "YAML",
        })
    }
}

/// The `format` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatSetting {
    /// Every value is JSON.
    Json,
    /// Every value is YAML.
    Yaml,
    /// By key extension: `.yaml`/`.yml` → YAML, anything else → JSON.
    Auto,
}

impl FormatSetting {
    /// Parses the setting; `None` (unset) means `auto`.
    ///
    /// # Errors
    ///
    /// A message naming the setting and the accepted values.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("auto") => Ok(Self::Auto),
            Some("json") => Ok(Self::Json),
            Some("yaml") => Ok(Self::Yaml),
            Some(_) => Err(format!(
                "the `format` setting must be \"json\", \"yaml\" or \"auto\", not {:?}",
                value.unwrap_or_default()
            )),
        }
    }

    /// The format `key` is checked as.
    pub fn for_key(self, key: &str) -> Format {
        match self {
            Self::Json => Format::Json,
            Self::Yaml => Format::Yaml,
            Self::Auto => {
                let name = key.rsplit('/').next().unwrap_or(key);
                match name
                    .rsplit_once('.')
                    .map(|(_, ext)| ext.to_ascii_lowercase())
                {
                    Some(ext) if ext == "yaml" || ext == "yml" => Format::Yaml,
                    _ => Format::Json,
                }
            }
        }
    }
}

/// The `on_invalid` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInvalid {
    /// Log an error and succeed.
    Log,
    /// Fail the event, so the gateway retries and dead-letters it.
    DeadLetter,
}

impl OnInvalid {
    /// Parses the setting; `None` (unset) means `log`.
    ///
    /// # Errors
    ///
    /// A message naming the setting and the accepted values.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("log") => Ok(Self::Log),
            Some("dead-letter") => Ok(Self::DeadLetter),
            Some(_) => Err(format!(
                "the `on_invalid` setting must be \"log\" or \"dead-letter\", not {:?}",
                value.unwrap_or_default()
            )),
        }
    }
}

/// Checks that `value` is UTF-8 text that parses as `format`.
///
/// # Errors
///
/// Why it does not, with the parser's position where it has one.
pub fn validate(value: &[u8], format: Format) -> Result<(), String> {
    let text = std::str::from_utf8(value).map_err(|e| format!("not UTF-8 text ({e})"))?;
    match format {
        Format::Json => serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map(|_| ())
            .map_err(|e| format!("invalid JSON: {e}")),
        Format::Yaml => Yaml::load_from_str(text)
            .map(|_| ())
            .map_err(|e| format!("invalid YAML: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        assert_eq!(FormatSetting::parse(None), Ok(FormatSetting::Auto));
        assert_eq!(FormatSetting::parse(Some("YAML")), Ok(FormatSetting::Yaml));
        assert_eq!(FormatSetting::parse(Some("json")), Ok(FormatSetting::Json));
        assert!(
            FormatSetting::parse(Some("xml"))
                .unwrap_err()
                .contains("`format`")
        );
        assert_eq!(OnInvalid::parse(None), Ok(OnInvalid::Log));
        assert_eq!(
            OnInvalid::parse(Some("dead-letter")),
            Ok(OnInvalid::DeadLetter)
        );
        assert!(
            OnInvalid::parse(Some("drop"))
                .unwrap_err()
                .contains("`on_invalid`")
        );
    }

    #[test]
    fn auto_format_follows_the_extension() {
        let auto = FormatSetting::Auto;
        assert_eq!(auto.for_key("app/config.json"), Format::Json);
        assert_eq!(auto.for_key("app/config.yaml"), Format::Yaml);
        assert_eq!(auto.for_key("app/config.YML"), Format::Yaml);
        assert_eq!(auto.for_key("app/config"), Format::Json);
        assert_eq!(auto.for_key("app.yaml/config"), Format::Json);
        assert_eq!(FormatSetting::Yaml.for_key("a.json"), Format::Yaml);
        assert_eq!(FormatSetting::Json.for_key("a.yaml"), Format::Json);
    }

    #[test]
    fn json() {
        for ok in [
            &b"{}"[..],
            b"[1, 2]",
            b" {\"a\": {\"b\": null}}\n",
            b"42",
            b"\"s\"",
        ] {
            assert_eq!(validate(ok, Format::Json), Ok(()), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\":}",
            b"{} {}",
            b"{'a': 1}",
            b"[1,]",
            b"\xff",
        ] {
            assert!(validate(bad, Format::Json).is_err(), "{bad:?}");
        }
        let err = validate(b"{\n  \"a\": tru\n}", Format::Json).unwrap_err();
        assert!(
            err.starts_with("invalid JSON: ") && err.contains(" line "),
            "{err}"
        );
    }

    #[test]
    fn yaml() {
        for ok in [
            &b""[..],
            b"a: 1\nb: [x, y]\n",
            b"---\na: 1\n---\nb: 2\n",
            b"list:\n  - one\n  - two: 2\n",
            b"{\"json\": \"is yaml\"}",
        ] {
            assert_eq!(validate(ok, Format::Yaml), Ok(()), "{ok:?}");
        }
        for bad in [
            &b"a: [1, 2"[..],
            b"a: 1\n b: 2\n  - c",
            b"key: \"unterminated\n",
            b"a: b: c\n",
            b"\xff",
        ] {
            assert!(validate(bad, Format::Yaml).is_err(), "{bad:?}");
        }
        let err = validate(b"a: [1, 2", Format::Yaml).unwrap_err();
        assert!(err.starts_with("invalid YAML: "), "{err}");
    }
}
