//! The manifest a plugin carries inside its `.wasm` file.
//!
//! Owns reading the `watchgate-manifest` custom section (written by the
//! SDK's `manifest!` macro, anywhere in the component: the core module the
//! compiler produced keeps it) and its schema. A manifest describes and
//! asks; it never grants: grants come only from the operator's sidecar. Its
//! text is the plugin author's and shows in `/v1/plugins`, so a section
//! over [`MAX_SECTION`] bytes rejects the file.

use serde::{Deserialize, Serialize};

use crate::event::Subscription;

/// The custom section's name.
pub const SECTION: &str = "watchgate-manifest";

/// Largest manifest section read; a real one is a few hundred bytes.
pub const MAX_SECTION: usize = 64 * 1024;

/// A capability a plugin may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// Write files in a granted directory.
    Files,
    /// Outbound HTTP to granted hosts.
    Http,
    /// Write back into etcd under granted prefixes.
    Kv,
    /// Read current values of subscribed keys.
    Snapshot,
    /// Run granted commands, signal granted processes.
    Commands,
}

impl Capability {
    /// The lowercase name, as in WIT and `[grants]`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Files => "files",
            Capability::Http => "http",
            Capability::Kv => "kv",
            Capability::Snapshot => "snapshot",
            Capability::Commands => "commands",
        }
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's own name (the file name still decides the name it
    /// runs under).
    pub name: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// One line on what it does.
    pub description: Option<String>,
    /// Capabilities it asks for.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Subscriptions it wants when the operator's sidecar gives none.
    #[serde(default)]
    pub subscribe: Vec<Subscription>,
}

/// Read the manifest of a component, if it has one.
///
/// # Errors
/// A message when the section is not UTF-8 TOML of the manifest schema, or
/// the binary cannot be parsed.
pub fn read(wasm: &[u8]) -> Result<Option<Manifest>, String> {
    let mut found: Option<String> = None;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| format!("cannot read the component: {e}"))?;
        if let wasmparser::Payload::CustomSection(c) = payload
            && c.name() == SECTION
        {
            if c.data().len() > MAX_SECTION {
                return Err(format!(
                    "the {SECTION} section is {} bytes, over the limit of {MAX_SECTION} bytes",
                    c.data().len()
                ));
            }
            let text = std::str::from_utf8(c.data())
                .map_err(|_| format!("the {SECTION} section is not UTF-8"))?;
            if found.is_some() {
                return Err(format!("more than one {SECTION} section"));
            }
            found = Some(text.to_owned());
        }
    }
    found
        .map(|text| {
            toml::from_str(&text)
                .map_err(|e| format!("the {SECTION} section is not a manifest: {e}"))
        })
        .transpose()
}

/// Requested against granted capabilities, for `check` and `/v1/plugins`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CapabilityReport {
    /// What the manifest asks for.
    pub requested: Vec<&'static str>,
    /// What the operator granted.
    pub granted: Vec<&'static str>,
    /// Requested but not granted: calls to these will fail.
    pub ungranted: Vec<&'static str>,
}

impl CapabilityReport {
    /// Compare a manifest's requests with granted capability names.
    pub fn new(manifest: Option<&Manifest>, granted: Vec<&'static str>) -> CapabilityReport {
        let mut requested: Vec<&'static str> = manifest
            .map(|m| m.capabilities.iter().map(|c| c.as_str()).collect())
            .unwrap_or_default();
        requested.sort_unstable();
        requested.dedup();
        let ungranted = requested
            .iter()
            .copied()
            .filter(|r| !granted.contains(r))
            .collect();
        CapabilityReport {
            requested,
            granted,
            ungranted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wasm_without_the_section_has_no_manifest() {
        // An empty core module: magic and version only.
        assert_eq!(read(b"\0asm\x01\0\0\0").unwrap(), None);
    }

    #[test]
    fn reads_the_custom_section_and_reports_ungranted() {
        let text = "name = \"x\"\nversion = \"1.0\"\ncapabilities = [\"http\", \"kv\"]\n\
                    [[subscribe]]\nsource = \"main\"\nprefix = \"/a/\"\n";
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        let name = SECTION.as_bytes();
        let body_len = 1 + name.len() + text.len();
        wasm.push(0);
        wasm.push(u8::try_from(body_len).unwrap());
        wasm.push(u8::try_from(name.len()).unwrap());
        wasm.extend_from_slice(name);
        wasm.extend_from_slice(text.as_bytes());
        let m = read(&wasm).unwrap().unwrap();
        assert_eq!(m.name.as_deref(), Some("x"));
        assert_eq!(m.subscribe[0].prefix, "/a/");
        let r = CapabilityReport::new(Some(&m), vec!["http", "files"]);
        assert_eq!(r.requested, vec!["http", "kv"]);
        assert_eq!(r.ungranted, vec!["kv"]);
    }

    #[test]
    fn a_bad_manifest_is_an_error() {
        let text = "capabilities = [\"root\"]";
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        let name = SECTION.as_bytes();
        wasm.push(0);
        wasm.push(u8::try_from(1 + name.len() + text.len()).unwrap());
        wasm.push(u8::try_from(name.len()).unwrap());
        wasm.extend_from_slice(name);
        wasm.extend_from_slice(text.as_bytes());
        assert!(read(&wasm).unwrap_err().contains("not a manifest"));
    }

    /// `n` as an unsigned LEB128.
    fn leb(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = u8::try_from(n & 0x7f).unwrap();
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn an_oversized_manifest_is_refused_naming_the_limit() {
        let text = format!("description = \"{}\"\n", "d".repeat(MAX_SECTION));
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        let name = SECTION.as_bytes();
        wasm.push(0);
        wasm.extend(leb(1 + name.len() + text.len()));
        wasm.push(u8::try_from(name.len()).unwrap());
        wasm.extend_from_slice(name);
        wasm.extend_from_slice(text.as_bytes());
        let e = read(&wasm).unwrap_err();
        assert!(
            e.contains(&format!(
                "{} bytes, over the limit of 65536 bytes",
                text.len()
            )),
            "{e}"
        );
    }
}
