//! Small helpers over decoded Avro [`Value`]s: fields looked up by name (unions looked through),
//! typed getters, reading containers, and re-shaping a value to another schema.
//!
//! Decoders read with the writer's schema and then map by name through these helpers, so a field
//! added, reordered or made nullable by a newer schema never breaks decoding.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};
use apache_avro::types::Value;

use super::DecodeError;

/// Strip union wrappers.
pub fn unwrap_union(v: &Value) -> &Value {
    let mut v = v;
    while let Value::Union(_, inner) = v {
        v = inner;
    }
    v
}

/// A record's field by name; `None` when absent or null.
pub fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match unwrap_union(v) {
        Value::Record(fields) => fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| unwrap_union(v))
            .filter(|v| !matches!(v, Value::Null)),
        Value::Map(m) => m.get(name).map(unwrap_union).filter(|v| !matches!(v, Value::Null)),
        _ => None,
    }
}

pub fn as_f64(v: &Value) -> Option<f64> {
    match unwrap_union(v) {
        Value::Double(x) => Some(*x),
        Value::Float(x) => Some(f64::from(*x)),
        Value::Int(x) => Some(f64::from(*x)),
        Value::Long(x) => Some(*x as f64),
        _ => None,
    }
}

pub fn as_i64(v: &Value) -> Option<i64> {
    match unwrap_union(v) {
        Value::Int(x) => Some(i64::from(*x)),
        Value::Long(x) => Some(*x),
        _ => None,
    }
}

pub fn as_str(v: &Value) -> Option<&str> {
    match unwrap_union(v) {
        Value::String(s) => Some(s),
        Value::Enum(_, s) => Some(s),
        _ => None,
    }
}

pub fn as_bytes(v: &Value) -> Option<&[u8]> {
    match unwrap_union(v) {
        Value::Bytes(b) => Some(b),
        Value::Fixed(_, b) => Some(b),
        _ => None,
    }
}

pub fn as_bool(v: &Value) -> Option<bool> {
    match unwrap_union(v) {
        Value::Boolean(b) => Some(*b),
        _ => None,
    }
}

/// A finite number field.
pub fn get_f64(rec: &Value, name: &str) -> Option<f64> {
    field(rec, name).and_then(as_f64).filter(|x| x.is_finite())
}
pub fn get_i64(rec: &Value, name: &str) -> Option<i64> {
    field(rec, name).and_then(as_i64)
}
pub fn get_str<'a>(rec: &'a Value, name: &str) -> Option<&'a str> {
    field(rec, name).and_then(as_str)
}
pub fn get_bytes<'a>(rec: &'a Value, name: &str) -> Option<&'a [u8]> {
    field(rec, name).and_then(as_bytes)
}
pub fn get_bool(rec: &Value, name: &str) -> Option<bool> {
    field(rec, name).and_then(as_bool)
}

/// A required field, as a `missing_field` error naming `ctx.name`.
pub fn require<T>(x: Option<T>, ctx: &str, name: &str) -> Result<T, DecodeError> {
    x.ok_or_else(|| DecodeError::MissingField(format!("{ctx}.{name}")))
}

/// An id that may be a long or a string, as text.
pub fn id_text(v: &Value) -> Option<String> {
    match unwrap_union(v) {
        Value::Long(x) => Some(x.to_string()),
        Value::Int(x) => Some(x.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// An Avro object container → its records, each decoded with the writer's schema. A header
/// failure is one error; a failure inside a block ends the list with that error (the records
/// before it are kept).
pub fn read_container(bytes: &[u8]) -> Result<Vec<Result<Value, DecodeError>>, DecodeError> {
    let reader = apache_avro::Reader::new(bytes)?;
    let mut out = Vec::new();
    for item in reader {
        match item {
            Ok(v) => out.push(Ok(v)),
            Err(e) => {
                out.push(Err(DecodeError::Avro(format!("record {}: {e}", out.len()))));
                break;
            }
        }
    }
    if out.is_empty() {
        return Err(DecodeError::Avro("container holds no records".into()));
    }
    Ok(out)
}

/// Named types of a set of schemas, by full name, for following `Schema::Ref`.
pub fn named_types<'a>(schemata: &[&'a Schema]) -> HashMap<String, &'a Schema> {
    fn walk<'a>(s: &'a Schema, ns: Option<String>, out: &mut HashMap<String, &'a Schema>) {
        let mut reg = |name: &Name| -> Option<String> {
            let full = name.fullname(ns.clone());
            out.insert(full.clone(), s);
            full.rsplit_once('.').map(|(ns, _)| ns.to_string())
        };
        match s {
            Schema::Record(r) => {
                let inner_ns = reg(&r.name);
                for f in &r.fields {
                    walk(&f.schema, inner_ns.clone(), out);
                }
            }
            Schema::Enum(e) => {
                reg(&e.name);
            }
            Schema::Fixed(f) => {
                reg(&f.name);
            }
            Schema::Array(a) => walk(&a.items, ns, out),
            Schema::Map(m) => walk(&m.types, ns, out),
            Schema::Union(u) => {
                for v in u.variants() {
                    walk(v, ns.clone(), out);
                }
            }
            _ => {}
        }
    }
    let mut out = HashMap::new();
    for s in schemata {
        walk(s, None, &mut out);
    }
    out
}

/// Re-shape `v` (decoded with some other schema) to fit `schema`, field by field by name:
/// numbers are converted between int/long/float/double, absent or null fields take the field's
/// default or null. With `lenient`, a required field with neither gets a zero value (used to
/// build synthetic packets under a newer schema in tests); otherwise it is a `missing_field`.
pub fn conform(v: &Value, schema: &Schema, names: &HashMap<String, &Schema>, lenient: bool, path: &str) -> Result<Value, DecodeError> {
    let v = unwrap_union(v);
    let miss = || DecodeError::MissingField(path.to_string());
    let mismatch = |want: &str| DecodeError::Avro(format!("{path}: cannot convert {v:?} to {want}"));
    match schema {
        Schema::Ref { name } => {
            let s = names.get(&name.fullname(None)).ok_or_else(|| DecodeError::Avro(format!("{path}: unknown type {}", name.fullname(None))))?;
            conform(v, s, names, lenient, path)
        }
        Schema::Union(u) => {
            let variants = u.variants();
            let null_idx = variants.iter().position(|s| matches!(s, Schema::Null));
            if matches!(v, Value::Null) {
                return match null_idx {
                    Some(i) => Ok(Value::Union(i as u32, Box::new(Value::Null))),
                    None => Err(miss()),
                };
            }
            let mut last = None;
            for (i, s) in variants.iter().enumerate() {
                if matches!(s, Schema::Null) {
                    continue;
                }
                match conform(v, s, names, lenient, path) {
                    Ok(x) => return Ok(Value::Union(i as u32, Box::new(x))),
                    Err(e) => last = Some(e),
                }
            }
            // A value that fits no branch of a nullable union (e.g. a record of all-null fields
            // standing for "absent") becomes null.
            match null_idx {
                Some(i) => Ok(Value::Union(i as u32, Box::new(Value::Null))),
                None => Err(last.unwrap_or_else(|| mismatch("union"))),
            }
        }
        Schema::Null => match v {
            Value::Null => Ok(Value::Null),
            _ => Err(mismatch("null")),
        },
        Schema::Record(r) => {
            let mut fields = Vec::with_capacity(r.fields.len());
            for f in &r.fields {
                let fpath = format!("{path}.{}", f.name);
                let src = field(v, &f.name);
                let val = match src {
                    Some(x) => conform(x, &f.schema, names, lenient, &fpath)?,
                    None => match conform(&Value::Null, &f.schema, names, lenient, &fpath) {
                        Ok(x) => x,
                        Err(e) => match &f.default {
                            Some(d) => {
                                let dv = Value::from(d.clone());
                                conform(&dv, &f.schema, names, lenient, &fpath)?
                            }
                            None if lenient => zero_value(&f.schema, names).ok_or(e)?,
                            None => return Err(e),
                        },
                    },
                };
                fields.push((f.name.clone(), val));
            }
            Ok(Value::Record(fields))
        }
        Schema::Array(a) => match v {
            Value::Array(items) => Ok(Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| conform(x, &a.items, names, lenient, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )),
            Value::Null => Err(miss()),
            _ => Err(mismatch("array")),
        },
        Schema::Map(m) => match v {
            Value::Map(items) => Ok(Value::Map(
                items
                    .iter()
                    .map(|(k, x)| Ok((k.clone(), conform(x, &m.types, names, lenient, &format!("{path}.{k}"))?)))
                    .collect::<Result<_, DecodeError>>()?,
            )),
            Value::Null => Err(miss()),
            _ => Err(mismatch("map")),
        },
        Schema::Boolean => as_bool(v).map(Value::Boolean).ok_or_else(|| if matches!(v, Value::Null) { miss() } else { mismatch("boolean") }),
        Schema::Int => match v {
            Value::Int(x) => Ok(Value::Int(*x)),
            Value::Long(x) => i32::try_from(*x).map(Value::Int).map_err(|_| mismatch("int")),
            Value::Null => Err(miss()),
            _ => Err(mismatch("int")),
        },
        Schema::Long => as_i64(v).map(Value::Long).ok_or_else(|| if matches!(v, Value::Null) { miss() } else { mismatch("long") }),
        Schema::Float => as_f64(v).map(|x| Value::Float(x as f32)).ok_or_else(|| if matches!(v, Value::Null) { miss() } else { mismatch("float") }),
        Schema::Double => as_f64(v).map(Value::Double).ok_or_else(|| if matches!(v, Value::Null) { miss() } else { mismatch("double") }),
        Schema::String => match v {
            Value::String(s) => Ok(Value::String(s.clone())),
            Value::Enum(_, s) => Ok(Value::String(s.clone())),
            Value::Null => Err(miss()),
            _ => Err(mismatch("string")),
        },
        Schema::Bytes => match v {
            Value::Bytes(b) | Value::Fixed(_, b) => Ok(Value::Bytes(b.clone())),
            Value::String(s) => Ok(Value::Bytes(s.as_bytes().to_vec())),
            Value::Null => Err(miss()),
            _ => Err(mismatch("bytes")),
        },
        Schema::Enum(e) => {
            let s = as_str(v).ok_or_else(|| if matches!(v, Value::Null) { miss() } else { mismatch("enum") })?;
            let i = e.symbols.iter().position(|x| x == s).ok_or_else(|| mismatch("enum symbol"))?;
            Ok(Value::Enum(i as u32, s.to_string()))
        }
        _ => Ok(v.clone()),
    }
}

/// The zero of a schema (lenient conform only).
fn zero_value(schema: &Schema, names: &HashMap<String, &Schema>) -> Option<Value> {
    Some(match schema {
        Schema::Ref { name } => return zero_value(names.get(&name.fullname(None))?, names),
        Schema::Boolean => Value::Boolean(false),
        Schema::Int => Value::Int(0),
        Schema::Long => Value::Long(0),
        Schema::Float => Value::Float(0.0),
        Schema::Double => Value::Double(0.0),
        Schema::String => Value::String(String::new()),
        Schema::Bytes => Value::Bytes(Vec::new()),
        Schema::Array(_) => Value::Array(Vec::new()),
        Schema::Map(_) => Value::Map(HashMap::new()),
        Schema::Record(r) => Value::Record(
            r.fields
                .iter()
                .map(|f| Some((f.name.clone(), zero_value(&f.schema, names)?)))
                .collect::<Option<_>>()?,
        ),
        Schema::Union(u) => {
            let i = u.variants().iter().position(|s| matches!(s, Schema::Null))?;
            Value::Union(i as u32, Box::new(Value::Null))
        }
        _ => return None,
    })
}
