//! What a plugin file is made of and what one instance of it takes from
//! the host: the language and toolchain that built it, and its core
//! instances, memories, tables and initial linear memory.
//!
//! Read from the sections during the pre-scan, before anything is
//! compiled, so that a file the instance pool cannot hold is refused in
//! milliseconds with the limit it passes, rather than after a compile of
//! tens of seconds (the largest SDK components take that long) and with
//! wasmtime's own words. The counts are per definition: a module that a
//! component instantiates twice counts once. wasmtime checks the exact
//! counts again when it builds the component, so an undercount here can
//! only delay a refusal, never let a file past the pool.
//!
//! The language comes from the `producers` custom sections compilers and
//! component tools leave behind, and from the module names componentize-py
//! gives its libraries; a plugin's language and toolchain are reported,
//! never trusted for anything.

use serde::Serialize;
use wasmparser::{Encoding, Instance, KnownCustom, Name, Payload};

use super::LoadError;

/// Most core instances one plugin instance may create: a component with
/// more is refused. The Python SDK's components create 14.
pub const MAX_CORE_INSTANCES: u32 = 32;
/// Most linear memories one plugin instance may define.
pub const MAX_MEMORIES: u32 = 4;
/// Most tables one plugin instance may define.
pub const MAX_TABLES: u32 = 16;

/// What a plugin file is made of and needs per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// The source language: `Rust`, `Python`, `JavaScript`, `Go`, another
    /// name a compiler recorded, or `unknown`.
    pub language: String,
    /// Tools that built it, as `name version`, as recorded in the file.
    pub toolchain: Vec<String>,
    /// Core module instances one plugin instance creates.
    pub core_instances: u32,
    /// Linear memories it defines.
    pub memories: u32,
    /// Tables it defines.
    pub tables: u32,
    /// Linear memory its instances start with, in bytes (every defined
    /// memory's initial size).
    pub initial_memory_bytes: u64,
}

impl Footprint {
    /// Whether an instance fits the pool's per-plugin bounds and a memory
    /// cap of `max_memory_mb` (`[runtime] max_memory_mb`).
    ///
    /// # Errors
    /// [`LoadError::DoesNotFit`] naming the bound.
    pub fn fits_pool(&self, max_memory_mb: u64) -> Result<(), LoadError> {
        let over = |what: &str, needs: u64, limit: u64, setting: &str| {
            Err(LoadError::DoesNotFit(format!(
                "needs {needs} {what} per instance, more than {setting} = {limit}"
            )))
        };
        if self.core_instances > MAX_CORE_INSTANCES {
            return over(
                "core instances",
                self.core_instances.into(),
                MAX_CORE_INSTANCES.into(),
                "the instance pool's fixed bound",
            );
        }
        if self.memories > MAX_MEMORIES {
            return over(
                "linear memories",
                self.memories.into(),
                MAX_MEMORIES.into(),
                "the instance pool's fixed bound",
            );
        }
        if self.tables > MAX_TABLES {
            return over(
                "tables",
                self.tables.into(),
                MAX_TABLES.into(),
                "the instance pool's fixed bound",
            );
        }
        if self.initial_memory_bytes > max_memory_mb << 20 {
            return over(
                "MiB of initial linear memory",
                self.initial_memory_bytes.div_ceil(1 << 20),
                max_memory_mb,
                "[runtime] max_memory_mb",
            );
        }
        Ok(())
    }

    /// Whether an instance can start under a plugin's `memory_mb` cap.
    ///
    /// # Errors
    /// A message naming `memory_mb` and what the plugin needs.
    pub fn fits_memory(&self, memory_mb: u64) -> Result<(), String> {
        if self.initial_memory_bytes > memory_mb << 20 {
            return Err(format!(
                "its instances start with {} of linear memory, more than its memory_mb = {memory_mb} \
                 (raise memory_mb in the sidecar's [limits] or in [runtime.defaults])",
                crate::text::human_bytes(self.initial_memory_bytes)
            ));
        }
        Ok(())
    }
}

/// One component or module being read.
#[derive(Default)]
struct Frame {
    module: bool,
    size: u64,
    name: Option<String>,
    language: Option<(String, String)>,
    processed_by: Vec<(String, String)>,
}

/// Collects a [`Footprint`] from the payloads of one pass over a file.
pub(super) struct Reader {
    total: u64,
    next_size: Option<u64>,
    stack: Vec<Frame>,
    root: Option<Frame>,
    /// The largest core module: its producers speak for the plugin's code.
    main: Option<Frame>,
    /// componentize-py links CPython as a module of this name.
    libpython: Option<String>,
    footprint: Footprint,
}

impl Reader {
    pub(super) fn new(total: u64) -> Reader {
        Reader {
            total,
            next_size: None,
            stack: Vec::new(),
            root: None,
            main: None,
            libpython: None,
            footprint: Footprint::default(),
        }
    }

    /// Take in one payload, in the order the parser gives them.
    pub(super) fn feed(&mut self, payload: &Payload<'_>) {
        match payload {
            Payload::Version { encoding, .. } => self.stack.push(Frame {
                module: *encoding == Encoding::Module,
                size: self.next_size.take().unwrap_or(self.total),
                ..Frame::default()
            }),
            Payload::ModuleSection {
                unchecked_range, ..
            }
            | Payload::ComponentSection {
                unchecked_range, ..
            } => {
                self.next_size = Some(unchecked_range.len() as u64);
            }
            Payload::End(_) => self.end(),
            Payload::InstanceSection(s) => {
                let made = s
                    .clone()
                    .into_iter()
                    .filter(|i| matches!(i, Ok(Instance::Instantiate { .. })))
                    .count();
                self.footprint.core_instances += u32::try_from(made).unwrap_or(u32::MAX);
            }
            Payload::MemorySection(s) => {
                for m in s.clone().into_iter().flatten() {
                    self.footprint.memories += 1;
                    let page = 1u64 << m.page_size_log2.unwrap_or(16);
                    self.footprint.initial_memory_bytes = self
                        .footprint
                        .initial_memory_bytes
                        .saturating_add(m.initial.saturating_mul(page));
                }
            }
            Payload::TableSection(s) => self.footprint.tables += s.count(),
            Payload::CustomSection(c) => {
                let Some(frame) = self.stack.last_mut() else {
                    return;
                };
                match c.as_known() {
                    KnownCustom::Producers(p) => {
                        for field in p.into_iter().flatten() {
                            let values = field
                                .values
                                .into_iter()
                                .flatten()
                                .map(|v| (v.name.to_owned(), v.version.to_owned()));
                            match field.name {
                                "language" => frame.language = values.into_iter().next(),
                                "processed-by" => frame.processed_by.extend(values),
                                _ => {}
                            }
                        }
                    }
                    KnownCustom::Name(n) => {
                        for name in n.into_iter().flatten() {
                            if let Name::Module { name, .. } = name {
                                frame.name = Some(name.to_owned());
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn end(&mut self) {
        let Some(frame) = self.stack.pop() else {
            return;
        };
        if self.stack.is_empty() {
            self.root = Some(frame);
            return;
        }
        if !frame.module {
            return;
        }
        if let Some(name) = &frame.name
            && name.starts_with("libpython")
        {
            self.libpython = Some(name.trim_end_matches(".so").to_owned());
        }
        if self.main.as_ref().is_none_or(|m| frame.size > m.size) {
            self.main = Some(frame);
        }
    }

    /// The footprint of everything fed in.
    pub(super) fn finish(self) -> Footprint {
        let root = self.root.unwrap_or_default();
        let main = self.main.unwrap_or_default();
        let made_by = |tool: &str| {
            root.processed_by
                .iter()
                .chain(&main.processed_by)
                .any(|(name, _)| name == tool)
        };
        let language = if let Some((language, _)) = &root.language {
            language.clone()
        } else if made_by("ComponentizeJS") {
            "JavaScript".to_owned()
        } else if self.libpython.is_some() {
            "Python".to_owned()
        } else if let Some((language, _)) = &main.language {
            language.clone()
        } else if made_by("wit-bindgen-rust") || made_by("rustc") {
            "Rust".to_owned()
        } else {
            "unknown".to_owned()
        };
        // Each tool once, newest last, as `name version` without the build
        // details some compilers append in parentheses.
        let mut toolchain: Vec<String> = Vec::new();
        let mut add = |name: &str, version: &str| {
            let version = version.split(" (").next().unwrap_or_default();
            let entry = format!("{name} {version}").trim_end().to_owned();
            let bare_language = name == language && version.is_empty();
            let listed = toolchain.iter().any(|t| t.split(' ').next() == Some(name));
            if !bare_language && !listed {
                toolchain.push(entry);
            }
        };
        for (name, version) in root.language.iter().chain(&main.language) {
            add(name, version);
        }
        if let Some(python) = &self.libpython {
            add(python, "");
        }
        for (name, version) in main.processed_by.iter().chain(&root.processed_by) {
            add(name, version);
        }
        Footprint {
            language,
            toolchain,
            ..self.footprint
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use wasm_encoder::{
        Component, CustomSection, InstanceSection, MemorySection, MemoryType, Module,
        ModuleSection, ProducersField, ProducersSection,
    };

    use super::*;
    use crate::runtime::{CompileLimits, compile::scan};

    fn producers(fields: &[(&str, &str, &str)]) -> ProducersSection {
        let mut section = ProducersSection::new();
        for (field, name, version) in fields {
            let mut f = ProducersField::new();
            f.value(name, version);
            section.field(field, &f);
        }
        section
    }

    /// A module of `bytes` padding bytes with one memory of `pages`
    /// pages, recorded as made by `made_by`.
    fn module(pages: u64, made_by: &[(&str, &str, &str)], bytes: usize) -> Module {
        let mut memories = MemorySection::new();
        memories.memory(MemoryType {
            minimum: pages,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        let mut m = Module::new();
        m.section(&memories);
        m.section(&producers(made_by));
        m.section(&CustomSection {
            name: Cow::Borrowed("padding"),
            data: Cow::Owned(vec![0; bytes]),
        });
        m
    }

    /// A component instantiating its first module `instances` times.
    fn component(modules: &[Module], instances: u32, made_by: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut c = Component::new();
        for m in modules {
            c.section(&ModuleSection(m));
        }
        let mut section = InstanceSection::new();
        for _ in 0..instances {
            section.instantiate(0, Vec::<(&str, wasm_encoder::ModuleArg)>::new());
        }
        c.section(&section);
        c.section(&producers(made_by));
        c.finish()
    }

    fn footprint(wasm: &[u8]) -> Footprint {
        scan(wasm, &CompileLimits::NONE).unwrap().footprint
    }

    #[test]
    fn counts_what_an_instance_takes_and_refuses_more_than_the_pool_gives() {
        let wasm = component(&[module(3, &[], 0), module(2, &[], 0)], 33, &[]);
        let f = footprint(&wasm);
        assert_eq!(f.core_instances, 33);
        assert_eq!(f.memories, 2);
        assert_eq!(f.initial_memory_bytes, 5 << 16);
        assert_eq!(
            f.fits_pool(256).unwrap_err().to_string(),
            "does not fit the instance pool: needs 33 core instances per instance, \
             more than the instance pool's fixed bound = 32"
        );
        let f = footprint(&component(&[module(64, &[], 0)], 1, &[]));
        assert!(f.fits_pool(256).is_ok());
        assert_eq!(
            f.fits_pool(2).unwrap_err().to_string(),
            "does not fit the instance pool: needs 4 MiB of initial linear memory per instance, \
             more than [runtime] max_memory_mb = 2"
        );
        assert_eq!(
            f.fits_memory(3).unwrap_err(),
            "its instances start with 4.0 MiB of linear memory, more than its memory_mb = 3 \
             (raise memory_mb in the sidecar's [limits] or in [runtime.defaults])"
        );
        assert!(f.fits_memory(4).is_ok());
    }

    #[test]
    fn the_language_comes_from_the_component_then_its_largest_module() {
        let js = component(
            &[module(1, &[("processed-by", "wit-component", "0.1")], 10)],
            1,
            &[
                ("language", "JavaScript", ""),
                ("processed-by", "ComponentizeJS", "0.23.0"),
            ],
        );
        let f = footprint(&js);
        assert_eq!(f.language, "JavaScript");
        assert_eq!(f.toolchain, ["wit-component 0.1", "ComponentizeJS 0.23.0"]);

        // The largest module speaks for the code, not a small helper.
        let go = component(
            &[
                module(1, &[("language", "Rust", "")], 10),
                module(1, &[("language", "Go", "go1.26.8 (linux)")], 1000),
            ],
            2,
            &[("processed-by", "wit-component", "0.262.0")],
        );
        let f = footprint(&go);
        assert_eq!(f.language, "Go");
        assert_eq!(f.toolchain, ["Go go1.26.8", "wit-component 0.262.0"]);

        let rust = component(
            &[module(
                1,
                &[("processed-by", "wit-bindgen-rust", "0.61.1")],
                10,
            )],
            1,
            &[],
        );
        assert_eq!(footprint(&rust).language, "Rust");
        assert_eq!(
            footprint(&component(&[module(1, &[], 0)], 1, &[])).language,
            "unknown"
        );
    }
}
