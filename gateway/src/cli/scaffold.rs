//! `watchgate plugin new`: a new plugin's directory in Rust, Python,
//! JavaScript or Go.
//!
//! Owns the choice of language, finding the SDK the plugin builds against,
//! and filling in the templates. The templates are the files under
//! `plugin-sdk/<lang>/template/` (`plugin-sdk/rust/template/` for Rust),
//! compiled into the binary so that it can scaffold without the repository's
//! files at hand; the SDK itself is still needed to build.
//!
//! A template names its values as `{{name}}` (the plugin's name),
//! `{{crate}}` (the name as a Rust crate's output file spells it), `{{sdk}}`
//! (the `plugin-sdk` directory) and `{{repo}}` (the repository holding it,
//! whose `scripts/` the non-Rust builds run). Every scaffold builds with
//! `./build.sh` into `NAME.wasm`.

use std::path::{Path, PathBuf};

/// The language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate on `watchgate-sdk` (plugin-sdk/).
    Rust,
    /// An `app.py` on the `watchgate` module (plugin-sdk/python).
    Python,
    /// A package on `@watchgate/sdk` (plugin-sdk/js).
    #[value(alias = "javascript")]
    Js,
    /// Package main on `watchgate.dev/sdk` (plugin-sdk/go).
    #[value(alias = "golang")]
    Go,
}

/// Arguments of `watchgate plugin new`.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The plugin's name: letters, digits, `-` and `_`.
    pub name: String,
    /// The language to write it in.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
    /// Where to create it (default: `./NAME`). Must not exist.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `plugin-sdk` directory of a watchgate repository (the Rust SDK
    /// crate, with `python/`, `js/` and `go/` beside it, and the
    /// repository's `scripts/` next to it). Default: `$WATCHGATE_SDK`,
    /// else the SDK of the repository this binary was built from, when it
    /// still exists.
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

/// One file of a template: where it goes and what it holds.
struct File {
    path: &'static str,
    text: &'static str,
}

macro_rules! file {
    ($lang:literal, $path:literal) => {
        file!($lang, $path, $path)
    };
    ($lang:literal, $path:literal, $source:literal) => {
        File {
            path: $path,
            text: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../plugin-sdk/",
                $lang,
                "/template/",
                $source
            )),
        }
    };
}

// Tools would read a template's `Cargo.toml` or `.gitignore` as their own,
// so those are stored under other names.
const RUST: &[File] = &[
    file!("rust", "Cargo.toml", "Cargo.toml.tmpl"),
    file!("rust", "src/lib.rs"),
    file!("rust", "build.sh"),
    file!("rust", "README.md"),
    file!("rust", "sidecar.example.toml"),
    file!("rust", "events.jsonl"),
    file!("rust", ".gitignore", "gitignore"),
];

const PYTHON: &[File] = &[
    file!("python", "app.py"),
    file!("python", "build.sh"),
    file!("python", "README.md"),
    file!("python", "sidecar.example.toml"),
    file!("python", "events.jsonl"),
    file!("python", ".gitignore", "gitignore"),
];

const JS: &[File] = &[
    file!("js", "package.json"),
    file!("js", "src/index.js"),
    file!("js", "build.sh"),
    file!("js", "README.md"),
    file!("js", "sidecar.example.toml"),
    file!("js", "events.jsonl"),
    file!("js", ".gitignore", "gitignore"),
];

const GO: &[File] = &[
    file!("go", "go.mod"),
    file!("go", "main.go"),
    file!("go", "manifest.toml"),
    file!("go", "build.sh"),
    file!("go", "README.md"),
    file!("go", "sidecar.example.toml"),
    file!("go", "events.jsonl"),
    file!("go", ".gitignore", "gitignore"),
];

impl Lang {
    fn files(self) -> &'static [File] {
        match self {
            Lang::Rust => RUST,
            Lang::Python => PYTHON,
            Lang::Js => JS,
            Lang::Go => GO,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
            Lang::Go => "Go",
        }
    }

    /// What the build needs from the SDK directory, relative to it.
    fn needs(self) -> &'static [&'static str] {
        match self {
            Lang::Rust => &["Cargo.toml"],
            Lang::Python => &["python/build.py", "../scripts/build-python-plugins"],
            Lang::Js => &["js/build.mjs", "../scripts/build-js-plugins"],
            Lang::Go => &["go/go.mod", "../scripts/build-go-plugins"],
        }
    }
}

/// The SDK directory: `--sdk`, `$WATCHGATE_SDK`, or the one this binary
/// was built from. Checked to hold what `lang`'s build needs.
fn find_sdk(args: &NewArgs) -> Result<PathBuf, String> {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
    let sdk = args
        .sdk
        .clone()
        .or_else(|| std::env::var_os("WATCHGATE_SDK").map(PathBuf::from))
        .or_else(|| built_in.join("Cargo.toml").exists().then_some(built_in));
    let Some(sdk) = sdk else {
        return Err("cannot find the watchgate SDK; pass --sdk PATH (the plugin-sdk directory of the watchgate repository)".into());
    };
    let canonical = sdk
        .canonicalize()
        .map_err(|e| format!("{}: {e}", sdk.display()))?;
    let missing: Vec<&str> = args
        .lang
        .needs()
        .iter()
        .filter(|p| !canonical.join(p).exists())
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{}: not the plugin-sdk directory of a watchgate repository with the {} SDK (missing {}); pass --sdk PATH",
            sdk.display(),
            args.lang.title(),
            missing.join(", ")
        ));
    }
    Ok(canonical)
}

/// `template` with its `{{…}}` values filled in.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
}

/// The files of a new plugin, relative to its directory, with whether
/// each is executable.
fn scaffold(lang: Lang, name: &str, sdk: &Path) -> Vec<(&'static str, String, bool)> {
    let sdk_path = sdk.display().to_string().replace('\\', "/");
    let repo = sdk.parent().unwrap_or(sdk).display().to_string();
    let crate_file = name.replace('-', "_");
    let values = [
        ("name", name),
        ("crate", crate_file.as_str()),
        ("sdk", sdk_path.as_str()),
        ("repo", repo.as_str()),
    ];
    lang.files()
        .iter()
        .map(|f| (f.path, render(f.text, &values), f.path.ends_with(".sh")))
        .collect()
}

fn write(dir: &Path, files: &[(&str, String, bool)]) -> Result<(), String> {
    for (path, text, executable) in files {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&target, text).map_err(|e| format!("{}: {e}", target.display()))?;
        #[cfg(unix)]
        if *executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", target.display()))?;
        }
        #[cfg(not(unix))]
        let _ = executable;
    }
    Ok(())
}

/// Run `plugin new`; returns the exit code.
pub fn plugin_new(args: &NewArgs) -> i32 {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        2
    };
    if !crate::plugin_dir::valid_name(&args.name) {
        return fail(format!(
            "{:?} is not a plugin name (letters, digits, '-' and '_', at most 64)",
            args.name
        ));
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() {
        return fail(format!("{} already exists", dir.display()));
    }
    let sdk = match find_sdk(args) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Err(e) = write(&dir, &scaffold(args.lang, &args.name, &sdk)) {
        return fail(e);
    }
    println!(
        "created {} plugin {} in {}",
        args.lang.title(),
        args.name,
        dir.display()
    );
    // The test suite runs the line after `cd` as the build command.
    println!("next:");
    println!("  cd {}", dir.display());
    println!("  ./build.sh");
    println!(
        "  watchgate plugin test {}.wasm --events events.jsonl",
        args.name
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_of_every_template_is_filled_in() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js, Lang::Go] {
            let files = scaffold(lang, "my-plugin", Path::new("/opt/wg/plugin-sdk"));
            for (path, text, _) in &files {
                assert!(!text.contains("{{"), "{lang:?} {path}: {text}");
            }
            let paths: Vec<&str> = files.iter().map(|f| f.0).collect();
            for common in [
                "build.sh",
                "README.md",
                "sidecar.example.toml",
                "events.jsonl",
                ".gitignore",
            ] {
                assert!(paths.contains(&common), "{lang:?} has no {common}");
            }
            let build = files.iter().find(|f| f.0 == "build.sh").unwrap();
            assert!(build.2, "{lang:?}: build.sh is not executable");
            assert!(build.1.contains("my-plugin.wasm"), "{lang:?}: {}", build.1);
            assert!(files.iter().filter(|f| f.2).count() == 1, "{lang:?}");
        }
    }

    #[test]
    fn the_sdk_and_its_repository_are_filled_in() {
        let sdk = Path::new("/opt/wg/plugin-sdk");
        let text = |lang, path| {
            scaffold(lang, "my-plugin", sdk)
                .into_iter()
                .find(|f| f.0 == path)
                .unwrap()
                .1
        };
        assert!(text(Lang::Rust, "Cargo.toml").contains("path = \"/opt/wg/plugin-sdk\""));
        assert!(text(Lang::Rust, "build.sh").contains("release/my_plugin.wasm"));
        assert!(text(Lang::Go, "go.mod").contains("=> /opt/wg/plugin-sdk/go"));
        assert!(text(Lang::Python, "build.sh").contains("/opt/wg/scripts/build-python-plugins"));
        assert!(text(Lang::Js, "build.sh").contains("/opt/wg/scripts/build-js-plugins"));
        assert!(text(Lang::Go, "build.sh").contains("/opt/wg/scripts/build-go-plugins"));
        assert!(text(Lang::Js, "package.json").contains("\"name\": \"my-plugin\""));
    }
}
