//! Action keys: what a node computes, hashed.
//!
//! key = blake3 over a canonical encoding of (kind, stage-kind version, the node's *resolved* parameters — every
//! default filled in by its kind — and the *output digests* of the inputs). Keying on the inputs' outputs rather than their keys gives early cut-off: an upstream node that
//! reruns and reproduces identical bytes changes no key downstream. Parameter tables are encoded with sorted keys
//! (their order in the file must not matter); lists keep their order (it does matter). Changing this encoding is
//! a cache-format change: bump `ENCODING` and the golden keys in the tests together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

const ENCODING: &[u8] = b"mpcs-action-v2\0";

/// Everything that determines a node's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub kind: String,
    pub version: u32,
    pub params: BTreeMap<String, Value>,
    /// (input node id, that input's output digest), in the node's input order.
    pub inputs: Vec<(String, String)>,
    /// Which `params` were defaults rather than written in the experiment: shown by `--why`, not hashed (writing
    /// a default out changes nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub defaults: Vec<String>,
    /// Where files named in the experiment are on this machine (their content digests are in `params`): handed
    /// to the stage, not hashed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub locations: BTreeMap<String, Value>,
}

impl Action {
    /// The action key: 32 hex digits (128 bits) of blake3.
    pub fn key(&self) -> String {
        let inputs = self.inputs.iter().map(|(id, d)| (id.as_str(), d.as_str()));
        key_of(&self.kind, self.version, &self.params, inputs)
    }
}

/// The key of an action given by its parts (so a key can be computed without building the action).
pub fn key_of<'a>(
    kind: &str,
    version: u32,
    params: &BTreeMap<String, Value>,
    inputs: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(ENCODING);
    put_str(&mut buf, kind);
    buf.extend_from_slice(&version.to_le_bytes());
    put_len(&mut buf, params.len());
    for (k, v) in params {
        put_str(&mut buf, k);
        encode(v, &mut buf);
    }
    put_len(&mut buf, inputs.len());
    for (id, digest) in inputs {
        put_str(&mut buf, id);
        put_str(&mut buf, digest);
    }
    blake3::hash(&buf).to_hex()[..32].to_string()
}

fn put_len(buf: &mut Vec<u8>, n: usize) {
    buf.extend_from_slice(&(n as u64).to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_len(buf, s.len());
    buf.extend_from_slice(s.as_bytes());
}

/// Canonical, self-delimiting encoding of a JSON value. Integers and floats are distinct types (1 ≠ 1.0);
/// -0.0 is encoded as 0.0.
fn encode(v: &Value, buf: &mut Vec<u8>) {
    match v {
        Value::Null => buf.push(0),
        Value::Bool(b) => {
            buf.push(1);
            buf.push(u8::from(*b));
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                buf.push(2);
                buf.extend_from_slice(&i.to_le_bytes());
            } else if let Some(u) = n.as_u64() {
                buf.push(3);
                buf.extend_from_slice(&u.to_le_bytes());
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                let f = if f == 0.0 { 0.0 } else { f };
                buf.push(4);
                buf.extend_from_slice(&f.to_bits().to_le_bytes());
            }
        }
        Value::String(s) => {
            buf.push(5);
            put_str(buf, s);
        }
        Value::Array(a) => {
            buf.push(6);
            put_len(buf, a.len());
            for x in a {
                encode(x, buf);
            }
        }
        Value::Object(m) => {
            buf.push(7);
            put_len(buf, m.len());
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                put_str(buf, k);
                encode(&m[k], buf);
            }
        }
    }
}

/// Converts a TOML value to the JSON value used in actions and manifests.
pub fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(t.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn action(params: Value) -> Action {
        let params = params.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Action {
            kind: "command".into(),
            version: 1,
            params,
            inputs: vec![("raw".into(), "ab".repeat(16))],
            defaults: Vec::new(),
            locations: BTreeMap::new(),
        }
    }

    /// Pinned literal key: if this changes, the cache format changed; bump ENCODING deliberately.
    #[test]
    fn golden_key() {
        let a = action(json!({"lr": 0.001, "run": ["sh", "-c", "x"], "fold": 2}));
        assert_eq!(a.key(), "c8ab320a9f48e430edd51dfe062018f6");
    }

    #[test]
    fn map_order_does_not_matter_but_list_order_does() {
        let a = action(json!({"opt": {"a": 1, "b": 2}}));
        let b = action(json!({"opt": {"b": 2, "a": 1}}));
        assert_eq!(a.key(), b.key());
        let c = action(json!({"l": [1, 2]}));
        let d = action(json!({"l": [2, 1]}));
        assert_ne!(c.key(), d.key());
    }

    #[test]
    fn types_and_values_matter() {
        assert_ne!(action(json!({"x": 1})).key(), action(json!({"x": 1.0})).key());
        assert_ne!(action(json!({"x": "1"})).key(), action(json!({"x": 1})).key());
        assert_eq!(action(json!({"x": 0.0})).key(), action(json!({"x": -0.0})).key());
        let mut a = action(json!({}));
        let k = a.key();
        a.inputs[0].1 = "cd".repeat(16);
        assert_ne!(k, a.key(), "an input digest is part of the key");
        a.version = 2;
        let k2 = a.key();
        a.version = 1;
        assert_ne!(k2, a.key(), "the stage version is part of the key");
        let k = a.key();
        a.defaults = vec!["lr".into()];
        assert_eq!(a.key(), k, "which values were defaults is not part of the key");
        a.locations.insert("target".into(), json!("/data/t.png"));
        assert_eq!(a.key(), k, "where files are is not part of the key");
    }
}
