//! docs/rpc.md cannot drift from the methods tidemarkd serves: it must name exactly the methods
//! `rpc_get_methods` of a running tidemarkd lists, document each one's parameters, and equal
//! what `tidemark rpc-reference` generates from the method table linked into the binaries. The
//! errors each method declares are checked against the daemon too: every method is called with
//! params that must fail, and its answer must be a code it declares (or -32602).

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use support::*;

const REGENERATE: &str = "cargo run --bin tidemark -- rpc-reference > docs/rpc.md";

fn generated() -> String {
    let out = Command::new(TIDEMARK).arg("rpc-reference").env_remove("TIDEMARK_TEST_HOOKS").output().expect("run tidemark rpc-reference");
    assert!(out.status.success(), "tidemark rpc-reference failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The methods a reference documents: its `### \`name\`` headings.
fn documented(md: &str) -> BTreeSet<String> {
    md.lines().filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`')).map(str::to_string).collect()
}

#[test]
fn the_rpc_reference_matches_the_running_daemon_and_the_method_table() {
    // The daemon as users run it: without the test-only methods.
    let d = Daemon::start_with(MINIMAL_CONFIG, &[], &[], |c| {
        c.env_remove("TIDEMARK_TEST_HOOKS");
    });
    let served: BTreeSet<String> =
        d.rpc("rpc_get_methods", json!(null)).as_array().expect("a list of names").iter().map(|v| v.as_str().expect("a name").to_string()).collect();
    assert!(served.len() > 50 && served.contains("bdev_malloc_create"), "{served:?}");

    let md = generated();
    let doc = documented(&md);
    let missing: Vec<_> = served.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "the generated reference and rpc_get_methods disagree: served but not documented {missing:?}, documented but not served {stale:?} \
         (a module linked into tidemarkd but not into tidemark?)"
    );

    // rpc_get_methods' default answer stays SPDK's (names); `detailed` adds the schemas.
    let detailed = d.rpc("rpc_get_methods", json!({"detailed": true}));
    let rows = detailed.as_array().expect("a list");
    assert_eq!(rows.iter().map(|r| r["name"].as_str().unwrap_or_default().to_string()).collect::<BTreeSet<_>>(), served);
    let malloc = rows.iter().find(|r| r["name"] == "bdev_malloc_create").expect("bdev_malloc_create");
    assert_eq!(malloc["module"], "malloc");
    let props = &malloc["params"]["properties"];
    assert!(props["num_blocks"].is_object() && props["block_size"].is_object(), "{malloc}");
    let required: Vec<&Value> = malloc["params"]["required"].as_array().expect("required").iter().collect();
    assert!(required.contains(&&json!("num_blocks")) && !required.contains(&&json!("name")), "{malloc}");

    every_method_answers_only_the_errors_it_declares(&d, rows);

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/rpc.md");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != md {
        let at = checked_in.lines().zip(md.lines()).position(|(a, b)| a != b).unwrap_or(checked_in.lines().count().min(md.lines().count()));
        panic!(
            "docs/rpc.md is not what the method table generates (first difference at line {}: {:?} there, {:?} generated); run `{REGENERATE}` and commit it",
            at + 1,
            checked_in.lines().nth(at).unwrap_or("<end>"),
            md.lines().nth(at).unwrap_or("<end>")
        );
    }
}

/// Methods not called: `spdk_kill_instance` stops the daemon this test runs against (with params
/// it ignores or accepts, it shuts down instead of failing).
const NOT_CALLED: &[&str] = &["spdk_kill_instance"];

/// The JSON types schema `s` accepts (`integer` also for `number`); `None` when it accepts any.
fn json_types(s: &Value) -> Option<BTreeSet<String>> {
    fn type_of(v: &Value) -> String {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
        .to_string()
    }
    let mut out = BTreeSet::new();
    match s.get("type") {
        Some(Value::String(t)) => {
            out.insert(t.clone());
        }
        Some(Value::Array(ts)) => out.extend(ts.iter().filter_map(Value::as_str).map(str::to_string)),
        _ => {}
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        out.extend(e.iter().map(type_of));
    }
    if let Some(c) = s.get("const") {
        out.insert(type_of(c));
    }
    for k in ["anyOf", "oneOf", "allOf"] {
        for alt in s.get(k).and_then(Value::as_array).into_iter().flatten() {
            out.extend(json_types(alt)?);
        }
    }
    if out.contains("number") {
        out.insert("integer".to_string());
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

/// A value of a type schema `s` refuses; `None` when it takes any.
fn wrong_value(s: &Value) -> Option<Value> {
    let ok = json_types(s)?;
    [json!("tm_wrong_type"), json!(12345), json!(true), json!([{"tm_wrong_type": 1}]), json!({"tm_wrong_type": 1})].into_iter().find(|v| {
        let t = match v {
            Value::String(_) => "string",
            Value::Number(_) => "integer",
            Value::Bool(_) => "boolean",
            Value::Array(_) => "array",
            _ => "object",
        };
        !ok.contains(t)
    })
}

/// Integer fields that number an object (iSCSI groups), and a number none has.
const NUMBERED: &[&str] = &["tag", "chap_group"];
const NO_SUCH_NUMBER: u64 = 65000;

/// Whether a string field names an object (a bdev, a subsystem, a store, a job) that the call
/// looks up. `tgt_name` and `alias_name` name nothing to look up (a wrong `tgt_name` is refused
/// before the subsystem is looked for).
fn names_an_object(field: &str) -> bool {
    !matches!(field, "tgt_name" | "alias_name" | "sig_name")
        && (matches!(field, "name" | "nqn" | "source" | "bdev" | "id" | "old_name" | "trtype") || field.ends_with("_name") || field.ends_with("bdev"))
}

/// A value schema `s` takes, naming nothing that exists: `tm_no_such_FIELD` for a string (an
/// enum's first value), 1 for a number, false, [], and an object of its required fields.
fn plausible(field: &str, s: &Value) -> Value {
    for k in ["anyOf", "oneOf"] {
        if let Some(alts) = s.get(k).and_then(Value::as_array) {
            let alts: Vec<&Value> = alts.iter().filter(|a| a.get("type") != Some(&json!("null"))).collect();
            // Prefer a string alternative (a name), else the first.
            let pick = alts.iter().find(|a| json_types(a).is_some_and(|t| t.contains("string"))).or(alts.first());
            if let Some(a) = pick {
                return plausible(field, a);
            }
        }
    }
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array).and_then(|e| e.iter().find(|v| !v.is_null())) {
        return e.clone();
    }
    let types = json_types(s).unwrap_or_default();
    if types.contains("string") {
        json!(format!("tm_no_such_{field}"))
    } else if types.contains("integer") {
        json!(1)
    } else if types.contains("boolean") {
        json!(false)
    } else if types.contains("array") {
        json!([])
    } else if types.contains("object") {
        required_fields(s)
    } else {
        json!("tm_no_such_value")
    }
}

/// Object schema `s`'s required fields, each [`plausible`].
fn required_fields(s: &Value) -> Value {
    let required: Vec<&str> = s.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut o = serde_json::Map::new();
    for (k, v) in s.get("properties").and_then(Value::as_object).into_iter().flatten() {
        if required.contains(&k.as_str()) {
            o.insert(k.clone(), plausible(k, v));
        }
    }
    Value::Object(o)
}

/// Calls every method (but [`NOT_CALLED`]) with params that must fail: each field of a wrong
/// type (an array for a method without fields), and, for a method with a field naming an
/// object, its required fields and name fields filled with names (or iSCSI tags) nothing has. A failure must
/// answer -32602 or a code the method declares; a call may also succeed (a create of a new
/// name). Several calls must answer a declared code other than -32602, so the check bites.
fn every_method_answers_only_the_errors_it_declares(d: &Daemon, rows: &[Value]) {
    let mut wrong: Vec<String> = Vec::new();
    let mut declared_answers: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows {
        let name = row["name"].as_str().expect("a name");
        if NOT_CALLED.contains(&name) {
            continue;
        }
        let declared: BTreeSet<i64> = row["errors"].as_array().expect("errors").iter().map(|e| e["code"].as_i64().expect("a code")).collect();
        let schema = &row["params"];
        let props = schema.get("properties").and_then(Value::as_object);
        let mut calls = Vec::new();
        // Wrong types.
        let typed: serde_json::Map<String, Value> = props.into_iter().flatten().filter_map(|(k, v)| Some((k.clone(), wrong_value(v)?))).collect();
        calls.push(if typed.is_empty() { json!(["tm_wrong_type"]) } else { Value::Object(typed) });
        // Names nothing has.
        let mut named = required_fields(schema);
        for (k, v) in props.into_iter().flatten() {
            let types = json_types(v).unwrap_or_default();
            if names_an_object(k) && types.contains("string") {
                named[k] = json!(format!("tm_no_such_{k}"));
            } else if NUMBERED.contains(&k.as_str()) && types.contains("integer") && !name.contains("_create") {
                // Not for a create: it would make the group, and the delete after it succeed.
                named[k] = json!(NO_SUCH_NUMBER);
            }
        }
        let names_one = |(k, v): (&String, &Value)| (names_an_object(k) && v.is_string()) || (NUMBERED.contains(&k.as_str()) && *v == json!(NO_SUCH_NUMBER));
        if named.as_object().is_some_and(|o| o.iter().any(names_one)) {
            calls.push(named);
        }
        for params in calls {
            match d.try_rpc(name, params.clone()) {
                Ok(_) => {}
                Err(e) if e.code == -32602 => {}
                Err(e) if declared.contains(&e.code) => {
                    declared_answers.insert(format!("{name} {params}"), e.code);
                }
                Err(e) => wrong.push(format!("{name} {params}: {} {:?} (declared: {declared:?})", e.code, e.message)),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "methods answered codes they do not declare (add them to the method's errors in its register_module! entry, or fix the handler):\n{}",
        wrong.join("\n")
    );
    assert!(
        declared_answers.len() >= 30 && declared_answers.iter().any(|(k, c)| k.starts_with("bdev_malloc_delete ") && *c == -19),
        "too few calls reached a declared error: {declared_answers:#?}"
    );
}
