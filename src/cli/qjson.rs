//! JSON printed the way QEMU prints it (`qobject_to_json_pretty`): 4-space indentation, and
//! object members in QDict iteration order (by bucket of QEMU's `tdb_hash`, newest first within a
//! bucket), so that `qnbd info --output=json` is byte-identical to `qemu-img info`.

use serde_json::Value;

const QDICT_BUCKET_MAX: u32 = 512;

/// qobject/qdict.c `tdb_hash`.
fn tdb_hash(name: &str) -> u32 {
    let b = name.as_bytes();
    let mut v: u32 = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345)
}

fn bucket(name: &str) -> u32 {
    tdb_hash(name) % QDICT_BUCKET_MAX
}

/// Render `v` as QEMU would. Members inserted later come first within a hash bucket, so build
/// objects in QEMU's insertion order.
pub fn to_qemu_pretty(v: &Value) -> String {
    let mut out = String::new();
    write(v, 0, &mut out);
    out
}

/// Members of an object in QDict iteration order.
pub fn qdict_order(m: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut members: Vec<(usize, &String, &Value)> =
        m.iter().enumerate().map(|(i, (k, v))| (i, k, v)).collect();
    members.sort_by_key(|(i, k, _)| (bucket(k), std::cmp::Reverse(*i)));
    members.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// QEMU's human dump of a QObject (block/qapi.c `dump_qdict` / `dump_qlist`): keys with
/// dashes turned into spaces, composites on their own lines, 4 spaces per level.
pub fn dump_human(v: &Value, indentation: usize, out: &mut String) {
    match v {
        Value::Object(m) => {
            for (k, val) in qdict_order(m) {
                let composite = matches!(val, Value::Object(_) | Value::Array(_));
                out.push_str(&" ".repeat(indentation * 4));
                out.push_str(&k.replace('-', " "));
                out.push(':');
                out.push(if composite { '\n' } else { ' ' });
                dump_human(val, indentation + 1, out);
                if !composite {
                    out.push('\n');
                }
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                let composite = matches!(val, Value::Object(_) | Value::Array(_));
                out.push_str(&" ".repeat(indentation * 4));
                out.push_str(&format!("[{i}]:"));
                out.push(if composite { '\n' } else { ' ' });
                dump_human(val, indentation + 1, out);
                if !composite {
                    out.push('\n');
                }
            }
        }
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
}

fn indent(n: usize, out: &mut String) {
    for _ in 0..n {
        out.push_str("    ");
    }
}

fn write(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut members: Vec<(usize, &String, &Value)> =
                m.iter().enumerate().map(|(i, (k, v))| (i, k, v)).collect();
            members.sort_by_key(|(i, k, _)| (bucket(k), std::cmp::Reverse(*i)));
            out.push_str("{\n");
            for (n, (_, k, val)) in members.iter().enumerate() {
                indent(level + 1, out);
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push_str(": ");
                write(val, level + 1, out);
                if n + 1 < members.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            indent(level, out);
            out.push('}');
        }
        Value::Array(a) => {
            out.push_str("[\n");
            for (n, val) in a.iter().enumerate() {
                indent(level + 1, out);
                write(val, level + 1, out);
                if n + 1 < a.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            indent(level, out);
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_members_like_qdict() {
        let v = serde_json::json!({
            "backing-filename-format": "raw",
            "virtual-size": 1,
            "dirty-flag": false,
            "filename": "a",
            "children": [],
        });
        let s = to_qemu_pretty(&v);
        let keys: Vec<&str> = s
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"'))
            .map(|l| l.split('"').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "dirty-flag"
            ]
        );
        assert!(s.contains("\"children\": [\n    ],"));
    }
}
