//! The template language: parsing, rendering and key naming rules.
//!
//! Pure Rust with no host calls, so it is unit-tested natively. It owns the
//! syntax and what a template references; it must not know where values are
//! stored (that is [`crate::store`]) or write files.
//!
//! Syntax: literal text with actions in `{{ … }}`. An action is a function
//! name followed by double-quoted arguments (`\"` and `\\` escape inside
//! them):
//!
//! - `{{ key "a/b" }}`: the value of key `a/b`; rendering fails if it is
//!   missing.
//! - `{{ key_or_default "a/b" "fallback" }}`: the value of `a/b`, or
//!   `fallback` when it is missing.
//! - `{{ keys "prefix/" }}`: one line `name=value` per key under `prefix/`,
//!   sorted by key, where `name` is the key with the prefix removed.

use std::fmt;

/// Keys under this prefix that end in [`TEMPLATE_SUFFIX`] are templates.
pub const TEMPLATE_PREFIX: &str = "templates/";
/// Suffix that marks a key under [`TEMPLATE_PREFIX`] as a template.
pub const TEMPLATE_SUFFIX: &str = ".tmpl";

/// True when `key` names a template rather than data.
pub fn is_template(key: &str) -> bool {
    output_path(key).is_some()
}

/// The output file of template `key`: `templates/app/app.conf.tmpl` →
/// `app/app.conf`. `None` when `key` is not a template or the path would be
/// empty.
pub fn output_path(key: &str) -> Option<&str> {
    let path = key
        .strip_prefix(TEMPLATE_PREFIX)?
        .strip_suffix(TEMPLATE_SUFFIX)?;
    (!path.is_empty()).then_some(path)
}

/// Read access to the data keys a template can use.
pub trait Data {
    /// The value of `key` as text; `None` when the key does not exist.
    fn get(&self, key: &str) -> Option<String>;
    /// Every data key starting with `prefix` with its value, in any order.
    fn under(&self, prefix: &str) -> Vec<(String, String)>;
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// Literal text, copied as is.
    Text(String),
    /// `{{ key "k" }}`.
    Key(String),
    /// `{{ key_or_default "k" "default" }}`.
    KeyOrDefault(String, String),
    /// `{{ keys "prefix" }}`.
    Keys(String),
}

/// A parsed template, ready to render many times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    nodes: Vec<Node>,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the offending action.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// `{{ key "…" }}` named a key that does not exist.
    MissingKey(String),
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingKey(key) => write!(f, "missing key {key:?}"),
        }
    }
}

impl Template {
    /// Parses template source.
    ///
    /// # Errors
    ///
    /// Fails on an unclosed `{{`, an unterminated string, an unknown
    /// function or a wrong number of arguments, naming the line.
    pub fn parse(src: &str) -> Result<Self, ParseError> {
        let mut nodes = Vec::new();
        let mut rest = src;
        let mut consumed = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                nodes.push(Node::Text(rest[..open].to_owned()));
            }
            let line = line_of(src, consumed + open);
            let body = &rest[open + 2..];
            let (args, used) = lex_action(body).map_err(|message| ParseError { line, message })?;
            nodes.push(build_node(args).map_err(|message| ParseError { line, message })?);
            let advance = open + 2 + used;
            consumed += advance;
            rest = &rest[advance..];
        }
        if !rest.is_empty() {
            nodes.push(Node::Text(rest.to_owned()));
        }
        Ok(Self { nodes })
    }

    /// True when rendering may change after data key `key` changes.
    pub fn depends_on(&self, key: &str) -> bool {
        self.nodes.iter().any(|node| match node {
            Node::Text(_) => false,
            Node::Key(k) | Node::KeyOrDefault(k, _) => k == key,
            Node::Keys(prefix) => key.starts_with(prefix.as_str()),
        })
    }

    /// Renders the template against `data`.
    ///
    /// # Errors
    ///
    /// Fails with [`RenderError::MissingKey`] for the first `key` action
    /// whose key does not exist.
    pub fn render(&self, data: &impl Data) -> Result<String, RenderError> {
        let mut out = String::new();
        for node in &self.nodes {
            match node {
                Node::Text(text) => out.push_str(text),
                Node::Key(key) => {
                    let value = data
                        .get(key)
                        .ok_or_else(|| RenderError::MissingKey(key.clone()))?;
                    out.push_str(&value);
                }
                Node::KeyOrDefault(key, default) => {
                    out.push_str(data.get(key).as_deref().unwrap_or(default));
                }
                Node::Keys(prefix) => {
                    let mut entries = data.under(prefix);
                    entries.sort();
                    for (key, value) in entries {
                        let name = key.strip_prefix(prefix.as_str()).unwrap_or(&key);
                        out.push_str(name);
                        out.push('=');
                        out.push_str(&value);
                        out.push('\n');
                    }
                }
            }
        }
        Ok(out)
    }
}

/// 1-based line number of byte offset `at` in `src`.
fn line_of(src: &str, at: usize) -> usize {
    src[..at].matches('\n').count() + 1
}

/// A lexed word of an action: a bare identifier or a quoted string.
#[derive(Debug, PartialEq, Eq)]
enum Word {
    Ident(String),
    Str(String),
}

/// Lexes the inside of an action up to and including its closing `}}`.
/// Returns the words and how many bytes of `body` were used.
fn lex_action(body: &str) -> Result<(Vec<Word>, usize), String> {
    let mut words = Vec::new();
    let mut chars = body.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if body[at..].starts_with("}}") {
            return Ok((words, at + 2));
        } else if c == '"' {
            chars.next();
            let mut text = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated string".to_owned()),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, escaped @ ('"' | '\\'))) => text.push(escaped),
                        Some((_, other)) => return Err(format!("unknown escape \\{other}")),
                        None => return Err("unterminated string".to_owned()),
                    },
                    Some((_, other)) => text.push(other),
                }
            }
            words.push(Word::Str(text));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut ident = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if !(c.is_ascii_alphanumeric() || c == '_') {
                    break;
                }
                ident.push(c);
                chars.next();
            }
            words.push(Word::Ident(ident));
        } else {
            return Err(format!("unexpected character {c:?} in action"));
        }
    }
    Err("unclosed {{".to_owned())
}

/// Turns the words of one action into a node, checking the function and
/// its arguments.
fn build_node(words: Vec<Word>) -> Result<Node, String> {
    let mut words = words.into_iter();
    let name = match words.next() {
        Some(Word::Ident(name)) => name,
        Some(Word::Str(s)) => return Err(format!("expected a function name, found string {s:?}")),
        None => return Err("empty action".to_owned()),
    };
    let args = words
        .map(|w| match w {
            Word::Str(s) => Ok(s),
            Word::Ident(i) => Err(format!(
                "{name}: arguments must be quoted strings, found {i}"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let arity = |n: usize| format!("{name} takes {n} argument(s), found {}", args.len());
    match (name.as_str(), args.as_slice()) {
        ("key", [key]) => Ok(Node::Key(key.clone())),
        ("key_or_default", [key, default]) => Ok(Node::KeyOrDefault(key.clone(), default.clone())),
        ("keys", [prefix]) => Ok(Node::Keys(prefix.clone())),
        ("key" | "keys", _) => Err(arity(1)),
        ("key_or_default", _) => Err(arity(2)),
        _ => Err(format!("unknown function {name:?}")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Map(BTreeMap<&'static str, &'static str>);

    impl Data for Map {
        fn get(&self, key: &str) -> Option<String> {
            self.0.get(key).map(|v| (*v).to_owned())
        }
        fn under(&self, prefix: &str) -> Vec<(String, String)> {
            // Reverse order on purpose: rendering must sort.
            self.0
                .iter()
                .rev()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }
    }

    fn data() -> Map {
        Map(BTreeMap::from([
            ("app/port", "8080"),
            ("app/host", "example.org"),
            ("db/b", "2"),
            ("db/a", "1"),
            ("db/nested/c", "3"),
        ]))
    }

    fn render(src: &str) -> Result<String, RenderError> {
        Template::parse(src).unwrap().render(&data())
    }

    #[test]
    fn plain_text_is_copied() {
        assert_eq!(render("no actions\n").unwrap(), "no actions\n");
        assert_eq!(render("").unwrap(), "");
        assert_eq!(render("a } b { c }").unwrap(), "a } b { c }");
    }

    #[test]
    fn key_is_substituted() {
        assert_eq!(
            render("listen {{ key \"app/host\" }}:{{key \"app/port\"}};\n").unwrap(),
            "listen example.org:8080;\n"
        );
    }

    #[test]
    fn missing_key_fails_with_its_name() {
        let err = render("x={{ key \"app/missing\" }}").unwrap_err();
        assert_eq!(err, RenderError::MissingKey("app/missing".to_owned()));
        assert_eq!(err.to_string(), "missing key \"app/missing\"");
    }

    #[test]
    fn key_or_default_falls_back() {
        assert_eq!(
            render(
                "{{ key_or_default \"app/port\" \"80\" }} {{ key_or_default \"app/tls\" \"off\" }}"
            )
            .unwrap(),
            "8080 off"
        );
    }

    #[test]
    fn keys_lists_sorted_relative_names() {
        assert_eq!(
            render("[db]\n{{ keys \"db/\" }}end\n").unwrap(),
            "[db]\na=1\nb=2\nnested/c=3\nend\n"
        );
        assert_eq!(render("{{ keys \"none/\" }}").unwrap(), "");
    }

    #[test]
    fn strings_support_escapes() {
        let t = Template::parse(r#"{{ key_or_default "x" "say \"hi\" \\ }}" }}"#).unwrap();
        assert_eq!(t.render(&data()).unwrap(), r#"say "hi" \ }}"#);
    }

    #[test]
    fn parse_errors_name_the_line() {
        let cases = [
            ("a\nb {{ key \"x\"", 2, "unclosed {{"),
            ("{{ key \"x }}", 1, "unterminated string"),
            ("\n\n{{ nope \"x\" }}", 3, "unknown function \"nope\""),
            ("{{ key }}", 1, "key takes 1 argument(s), found 0"),
            (
                "{{ key \"a\" \"b\" }}",
                1,
                "key takes 1 argument(s), found 2",
            ),
            (
                "{{ key_or_default \"a\" }}",
                1,
                "key_or_default takes 2 argument(s), found 1",
            ),
            ("{{ }}", 1, "empty action"),
            (
                "{{ key x }}",
                1,
                "key: arguments must be quoted strings, found x",
            ),
            (
                "{{ \"x\" }}",
                1,
                "expected a function name, found string \"x\"",
            ),
            ("{{ key \"\\n\" }}", 1, "unknown escape \\n"),
            ("{{ key | \"x\" }}", 1, "unexpected character '|' in action"),
        ];
        for (src, line, message) in cases {
            let err = Template::parse(src).unwrap_err();
            assert_eq!(
                err,
                ParseError {
                    line,
                    message: message.to_owned()
                },
                "source {src:?}"
            );
        }
    }

    #[test]
    fn dependencies_follow_keys_and_prefixes() {
        let t =
            Template::parse("{{ key \"a/x\" }}{{ key_or_default \"b\" \"d\" }}{{ keys \"c/\" }}")
                .unwrap();
        assert!(t.depends_on("a/x"));
        assert!(t.depends_on("b"));
        assert!(t.depends_on("c/anything/deep"));
        assert!(!t.depends_on("a/y"));
        assert!(!t.depends_on("c"));
        assert!(!Template::parse("static").unwrap().depends_on("a/x"));
    }

    #[test]
    fn template_keys_map_to_output_paths() {
        assert_eq!(
            output_path("templates/app/app.conf.tmpl"),
            Some("app/app.conf")
        );
        assert_eq!(output_path("templates/x.tmpl"), Some("x"));
        assert_eq!(output_path("templates/.tmpl"), None);
        assert_eq!(output_path("templates/app/app.conf"), None);
        assert_eq!(output_path("other/app.conf.tmpl"), None);
        assert!(is_template("templates/a.tmpl"));
        assert!(!is_template("templates/a.txt"));
    }
}
