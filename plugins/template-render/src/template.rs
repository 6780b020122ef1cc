//! The template language: Jinja (minijinja) with functions over the store.
//!
//! Pure Rust with no host calls, so it is unit-tested natively. It owns the
//! syntax, the functions templates call and what a render read; it must not
//! know where values are stored (that is [`crate::store`]) or write files.
//!
//! Templates are Jinja as implemented by minijinja, with `trim_blocks` and
//! `lstrip_blocks` on (a line holding only a `{% … %}` tag leaves nothing
//! in the output), the trailing newline kept, no HTML escaping, and
//! undefined values strict (printing or iterating `x.missing` is an error;
//! `default` and `is defined` work). Functions:
//!
//! - `key(k)`: the value of key `k`; rendering fails when it is missing.
//! - `key_or_default(k, d)`: the value of `k`, or `d` when it is missing.
//! - `keys(prefix)`: a mapping from name (the key with `prefix` removed) to
//!   value, for every key under `prefix`, in key order.
//! - `instances(prefix)`: the service instances under `prefix` (values as
//!   the Consul and Nacos sources write them, or any JSON object with an
//!   address and a port), in key order; see [`instance`].
//! - `services(name)`: `instances("services/" ~ name ~ "/")`; without an
//!   argument, the names of the services under `services/`, sorted.
//! - `json(s)`, `yaml(s)`: parse text (also as filters:
//!   `key("a") | json`).
//!
//! Every function records what it read ([`Deps`]), so the plugin knows
//! which changes can change a template's output.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::value::Rest;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// Keys under this prefix that end in [`TEMPLATE_SUFFIX`] are templates.
pub const TEMPLATE_PREFIX: &str = "templates/";
/// Suffix that marks a key under [`TEMPLATE_PREFIX`] as a template.
pub const TEMPLATE_SUFFIX: &str = ".tmpl";
/// Where `services(name)` looks: the keys the Consul and Nacos sources use.
pub const SERVICES_PREFIX: &str = "services/";

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

/// The data keys a template can read (templates are not data), with their
/// values as text, in key order.
pub type Data = BTreeMap<String, String>;

/// What one render read: keys and prefixes. A change to a key in `keys`,
/// or under a prefix in `prefixes`, may change the output; no other can.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deps {
    /// Keys read one by one (`key`, `key_or_default`).
    pub keys: BTreeSet<String>,
    /// Prefixes listed (`keys`, `instances`, `services`).
    pub prefixes: BTreeSet<String>,
}

impl Deps {
    /// True when a change of `key` may change the output.
    pub fn depends_on(&self, key: &str) -> bool {
        self.keys.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// A render's text, or why it failed, with what it read either way.
#[derive(Debug)]
pub struct Rendered {
    /// The output, or the error (with its line when known).
    pub output: Result<String, String>,
    /// What the render read before it ended.
    pub deps: Deps,
}

/// Renders template `name` (its key, used in error messages) from `src`.
pub fn render(name: &str, src: &str, data: &Arc<Data>) -> Rendered {
    let deps = Arc::new(Mutex::new(Deps::default()));
    let env = environment(data, &deps);
    let output = env
        .template_from_named_str(name, src)
        .and_then(|t| t.render(()))
        .map_err(|e| describe(&e));
    let deps = deps.lock().unwrap_or_else(PoisonError::into_inner).clone();
    Rendered { output, deps }
}

/// An error as one line: what went wrong and where.
fn describe(e: &Error) -> String {
    let what = e
        .detail()
        .map_or_else(|| e.kind().to_string(), str::to_owned);
    match e.line() {
        Some(line) => format!("line {line}: {what}"),
        None => what,
    }
}

/// The environment a render runs in: settings, functions and filters.
fn environment(data: &Arc<Data>, deps: &Arc<Mutex<Deps>>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build();
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }

    let read = Reader {
        data: Arc::clone(data),
        deps: Arc::clone(deps),
    };
    let r = read.clone();
    env.add_function("key", move |k: String| {
        r.key(&k)
            .map(Value::from)
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, format!("missing key {k:?}")))
    });
    let r = read.clone();
    env.add_function("key_or_default", move |k: String, d: Value| {
        r.key(&k).map_or(d, Value::from)
    });
    let r = read.clone();
    env.add_function("keys", move |prefix: String| {
        let named: BTreeMap<String, String> = r
            .under(&prefix)
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_owned(), v))
            .collect();
        to_value(&named)
    });
    let r = read.clone();
    env.add_function("instances", move |prefix: String| r.instances(&prefix));
    let r = read;
    env.add_function("services", move |name: Rest<String>| {
        match name.as_slice() {
            [] => Ok(r.service_names()),
            [name] => r.instances(&format!("{SERVICES_PREFIX}{name}/")),
            _ => Err(Error::new(
                ErrorKind::TooManyArguments,
                "services takes at most one argument (a service name)",
            )),
        }
    });
    env.add_function("json", parse_json);
    env.add_filter("json", parse_json);
    env.add_function("yaml", parse_yaml);
    env.add_filter("yaml", parse_yaml);
    env
}

/// The functions' view of the data, recording what they read.
#[derive(Clone)]
struct Reader {
    data: Arc<Data>,
    deps: Arc<Mutex<Deps>>,
}

impl Reader {
    fn deps(&self) -> std::sync::MutexGuard<'_, Deps> {
        self.deps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self, key: &str) -> Option<String> {
        self.deps().keys.insert(key.to_owned());
        self.data.get(key).cloned()
    }

    fn under(&self, prefix: &str) -> Vec<(String, String)> {
        self.deps().prefixes.insert(prefix.to_owned());
        self.data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn instances(&self, prefix: &str) -> Result<Value, Error> {
        let mut out = Vec::new();
        for (key, value) in self.under(prefix) {
            let name = &key[prefix.len()..];
            let inst = instance(&key, name, &value).map_err(|e| {
                Error::new(ErrorKind::InvalidOperation, format!("instance {key}: {e}"))
            })?;
            out.push(inst);
        }
        Ok(to_value(&out))
    }

    fn service_names(&self) -> Value {
        let names: BTreeSet<String> = self
            .under(SERVICES_PREFIX)
            .into_iter()
            .filter_map(|(k, _)| {
                let rest = &k[SERVICES_PREFIX.len()..];
                rest.split_once('/').map(|(s, _)| s.to_owned())
            })
            .collect();
        to_value(&names)
    }
}

/// One service instance from its key and JSON value, with normalized fields
/// added to the source's own:
///
/// - `key`: the whole key; `name`: the key with the prefix removed (Consul:
///   the instance id; Nacos: `ip:port`);
/// - `address`: `address` (Consul, etcd), else `ip` (Nacos), else `host`;
/// - `port`: a number;
/// - `healthy`: Consul `status` `passing` or `warning`; Nacos `healthy`;
///   else `healthy` when it is a boolean, else true;
/// - `tags` (else `[]`), `meta` (Consul `meta`, Nacos `metadata`, else `{}`),
///   `weight` (else 1), `id` (else `instance_id`, else `name`).
///
/// # Errors
///
/// The value is not a JSON object, or has no address or port.
pub fn instance(key: &str, name: &str, value: &str) -> Result<Json, String> {
    let Json::Object(mut obj) =
        serde_json::from_str::<Json>(value).map_err(|e| format!("not JSON: {e}"))?
    else {
        return Err("not a JSON object".to_owned());
    };
    let text = |obj: &Map<String, Json>, field: &str| {
        obj.get(field)
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let address = text(&obj, "address")
        .or_else(|| text(&obj, "ip"))
        .or_else(|| text(&obj, "host"))
        .ok_or("no address, ip or host")?;
    let port = match obj.get("port") {
        Some(Json::Number(n)) => n.as_u64(),
        Some(Json::String(s)) => s.parse().ok(),
        _ => None,
    }
    .filter(|p| (1..=65_535).contains(p))
    .ok_or("no port from 1 to 65535")?;
    let healthy = match (obj.get("status"), obj.get("healthy")) {
        (Some(Json::String(s)), _) => s == "passing" || s == "warning",
        (_, Some(Json::Bool(b))) => *b,
        _ => true,
    };
    let meta = obj
        .get("meta")
        .or_else(|| obj.get("metadata"))
        .filter(|m| m.is_object())
        .cloned()
        .unwrap_or_else(|| Json::Object(Map::new()));
    let id = text(&obj, "id")
        .or_else(|| text(&obj, "instance_id"))
        .unwrap_or_else(|| name.to_owned());
    obj.insert("key".into(), key.into());
    obj.insert("name".into(), name.into());
    obj.insert("address".into(), address.into());
    obj.insert("port".into(), port.into());
    obj.insert("healthy".into(), healthy.into());
    obj.insert("meta".into(), meta);
    obj.insert("id".into(), id.into());
    obj.entry("tags").or_insert_with(|| Json::Array(Vec::new()));
    obj.entry("weight").or_insert_with(|| 1.into());
    Ok(Json::Object(obj))
}

/// Any serializable value as a template value.
fn to_value<T: Serialize>(v: &T) -> Value {
    Value::from(minijinja::value::Serde(v))
}

/// `json(s)`: the value of JSON text.
fn parse_json(text: &str) -> Result<Value, Error> {
    serde_json::from_str::<Json>(text)
        .map(|v| to_value(&v))
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("invalid JSON: {e}")))
}

/// `yaml(s)`: the value of YAML text (one document; several are an error).
fn parse_yaml(text: &str) -> Result<Value, Error> {
    use saphyr::LoadableYamlNode as _;
    let invalid = |m: String| Error::new(ErrorKind::InvalidOperation, format!("invalid YAML: {m}"));
    let docs = saphyr::Yaml::load_from_str(text).map_err(|e| invalid(e.to_string()))?;
    match docs.as_slice() {
        [] => Ok(Value::from(())),
        [doc] => yaml_to_json(doc).map(|v| to_value(&v)).map_err(invalid),
        _ => Err(invalid(format!("{} documents, expected one", docs.len()))),
    }
}

/// A YAML node as JSON, so templates see one kind of value.
fn yaml_to_json(node: &saphyr::Yaml<'_>) -> Result<Json, String> {
    use saphyr::{Scalar, Yaml};
    Ok(match node {
        Yaml::Value(Scalar::Null) => Json::Null,
        Yaml::BadValue => return Err("a value that cannot be read".to_owned()),
        Yaml::Value(Scalar::Boolean(b)) => Json::Bool(*b),
        Yaml::Value(Scalar::Integer(i)) => Json::from(*i),
        Yaml::Value(Scalar::FloatingPoint(f)) => {
            serde_json::Number::from_f64(f.into_inner()).map_or(Json::Null, Json::Number)
        }
        Yaml::Value(Scalar::String(s)) => Json::String(s.to_string()),
        Yaml::Sequence(items) => {
            Json::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(map) => {
            let mut obj = Map::new();
            for (k, v) in map {
                let key = match yaml_to_json(k)? {
                    Json::String(s) => s,
                    Json::Null => "null".to_owned(),
                    other => other.to_string(),
                };
                obj.insert(key, yaml_to_json(v)?);
            }
            Json::Object(obj)
        }
        Yaml::Representation(text, _, _) => Json::String(text.to_string()),
        Yaml::Tagged(_, inner) => yaml_to_json(inner)?,
        Yaml::Alias(_) => return Err("aliases are not supported".to_owned()),
    })
}

#[cfg(test)]
mod tests;
