//! The RPC reference, made from the method table: docs/rpc.md (`tidemark rpc-reference`),
//! `tidemark METHOD --help` and `tidemark --help` all read the declarations here, so what they
//! say is what the linked code serves. A method's parameters come from the JSON Schema of its
//! params type (derived with `schemars` from the struct its handler parses, serde attributes
//! and doc comments included), so documenting a new method is naming that type in
//! [`register_module!`](crate::register_module).

use super::{declared, MethodDecl, ModuleDecl};
use schemars::JsonSchema;
use serde_json::{json, Value};
use std::fmt::Write;

/// The schema of params type `T`, nested types inlined (a parameter reads as one row).
pub fn schema_of<T: JsonSchema>() -> schemars::Schema {
    let mut s = schemars::generate::SchemaSettings::draft2020_12();
    s.inline_subschemas = true;
    s.into_generator().into_root_schema_for::<T>()
}

/// One parameter as the reference shows it.
#[derive(Debug, PartialEq)]
pub struct Param {
    /// Dotted for a field of a nested object (`listen_address.traddr`, as the CLI takes it),
    /// `[]` for the elements of an array of objects (`luns[].bdev_name`).
    pub name: String,
    pub ty: String,
    pub required: bool,
    /// The default as JSON, when the type has one worth showing (not `null`).
    pub default: Option<String>,
    pub doc: String,
}

/// What the reference says about one method's params.
#[derive(Debug)]
pub struct Params {
    pub params: Vec<Param>,
    /// Whether fields the method does not know are ignored rather than refused.
    pub others_ignored: bool,
    /// The params type's doc comment.
    pub doc: String,
}

/// The params of `m`, read from its params type's schema.
pub fn params(m: &MethodDecl) -> Params {
    let schema = (m.params)().to_value();
    let mut params = Vec::new();
    collect(&schema, "", &mut params);
    // Required first, a nested row staying under its top-level field (the schema's properties
    // come sorted by name, an order kept within each group).
    let top_required = |name: &str| params.iter().any(|p| p.required && p.name == name.split(['.', '[']).next().unwrap_or(name));
    let keys: Vec<bool> = params.iter().map(|p| !top_required(&p.name)).collect();
    let mut keyed: Vec<(bool, Param)> = keys.into_iter().zip(params).collect();
    keyed.sort_by_key(|(k, _)| *k);
    let params = keyed.into_iter().map(|(_, p)| p).collect();
    Params { params, others_ignored: schema.get("additionalProperties") != Some(&json!(false)), doc: one_line(schema.get("description")) }
}

/// The rows of object schema `s`'s properties, named under `prefix`.
fn collect(s: &Value, prefix: &str, out: &mut Vec<Param>) {
    let Some(props) = s.get("properties").and_then(Value::as_object) else { return };
    let required: Vec<&str> = s.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for (name, p) in props {
        let full = format!("{prefix}{name}");
        let default = p.get("default").filter(|d| !d.is_null()).map(Value::to_string);
        out.push(Param { name: full.clone(), ty: type_name(p), required: required.contains(&name.as_str()), default, doc: one_line(p.get("description")) });
        let inner = non_null(p);
        collect(inner, &format!("{full}."), out);
        if let Some(items) = inner.get("items") {
            collect(non_null(items), &format!("{full}[]."), out);
        }
    }
}

/// `s` without its `null` alternative (an `Option`'s schema).
fn non_null(s: &Value) -> &Value {
    for k in ["anyOf", "oneOf"] {
        if let Some(alts) = s.get(k).and_then(Value::as_array) {
            let mut rest = alts.iter().filter(|a| a.get("type") != Some(&json!("null")));
            if let (Some(one), None) = (rest.next(), rest.next()) {
                return one;
            }
        }
    }
    s
}

/// A short type: `integer (uint64)`, `string`, `array of string`, `"toml" | "spdk"`.
fn type_name(s: &Value) -> String {
    let s = non_null(s);
    if let Some(c) = s.get("const") {
        return c.to_string();
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.iter().filter(|v| !v.is_null()).map(Value::to_string).collect::<Vec<_>>().join(" | ");
    }
    for k in ["anyOf", "oneOf"] {
        if let Some(alts) = s.get(k).and_then(Value::as_array) {
            let mut names: Vec<String> = alts.iter().filter(|a| a.get("type") != Some(&json!("null"))).map(type_name).collect();
            names.dedup();
            return names.join(" | ");
        }
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => vec![],
    };
    if types.is_empty() {
        return "any".to_string();
    }
    let one = |t: &str| match t {
        "array" => format!("array of {}", s.get("items").map_or_else(|| "any".to_string(), type_name)),
        "integer" | "number" | "string" => match s.get("format").and_then(Value::as_str) {
            Some(f) => format!("{t} ({f})"),
            None => t.to_string(),
        },
        other => other.to_string(),
    };
    types.into_iter().map(one).collect::<Vec<_>>().join(" | ")
}

/// A doc comment on one line (rustdoc wraps them).
fn one_line(d: Option<&Value>) -> String {
    d.and_then(Value::as_str).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The errors `m` declares, one row per code in the order first declared, the reasons of a
/// code declared by several sets joined.
pub fn errors(m: &MethodDecl) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = Vec::new();
    for &(code, when) in m.errors.iter().flat_map(|set| set.iter()) {
        match out.iter_mut().find(|(c, _)| *c == code) {
            Some((_, w)) if w.split("; ").any(|x| x == when) => {}
            Some((_, w)) => {
                w.push_str("; ");
                w.push_str(when);
            }
            None => out.push((code, when.to_string())),
        }
    }
    out
}

/// `-19 (ENODEV)`.
pub fn code_label(code: i32) -> String {
    match crate::rpc::code_name(code) {
        Some(n) if code >= -1000 => format!("{code} ({n})"),
        _ => code.to_string(),
    }
}

/// The modules that make the reference: those enabled in this process, each with its methods
/// sorted by name; modules without methods are left out.
pub fn modules() -> Vec<(&'static ModuleDecl, Vec<&'static MethodDecl>)> {
    declared()
        .into_iter()
        .filter(|d| !d.methods.is_empty())
        .map(|d| {
            let mut ms: Vec<&MethodDecl> = d.methods.iter().collect();
            ms.sort_by_key(|m| m.name);
            (d, ms)
        })
        .collect()
}

/// The command that writes docs/rpc.md (the reference test quotes it when the file is stale).
pub const REGENERATE: &str = "cargo run --bin tidemark -- rpc-reference > docs/rpc.md";

/// docs/rpc.md.
pub fn markdown() -> String {
    let mut o = String::new();
    let mods = modules();
    // Writing to a String cannot fail.
    let _ = writeln!(
        o,
        "# RPC reference

<!-- Generated from the method table by `tidemark rpc-reference`; do not edit. Regenerate with
     `{REGENERATE}`. tests/rpc_reference.rs checks it against
     `rpc_get_methods` of a running tidemarkd. -->

Every JSON-RPC method tidemarkd serves, by module, with its parameters as the method's params
type declares them (docs/how-to-add-a-module.md). Calls are JSON-RPC 2.0 on the Unix socket
(`tidemark METHOD --param value`, SPDK's `rpc.py`); params are one JSON object. A field the method
does not know is refused with -32602 unless the method says otherwise. Dotted names are fields of
a nested object (`listen_address.traddr`), `[]` the elements of an array. `tidemark METHOD --help`
prints the same for one method, and `rpc_get_methods` with `{{\"detailed\": true}}` returns the
params' JSON Schema.

## Errors

Every method answers a JSON-RPC error object `{{\"code\", \"message\"}}`; the message names the
offending field or object. Each method below lists the errors it answers and when. Not repeated
there: -32602 for a bad params object (a missing, unknown or mistyped field, a value out of range),
which every method that takes parameters answers, and -32603 or -110, which any method that works
on the reactors answers when one fails or does not answer in time. The codes, as SPDK uses them:

| code | meaning |
|---|---|
| -32700 | the request is not JSON |
| -32600 | the request is not a JSON-RPC 2.0 request (or too large) |
| -32601 | no such method |
| -32602 | invalid parameters: a missing, unknown or mistyped field, a value out of range, or a value tidemark does not support (the field and why are named) |
| -32603 | internal error |
| -1 (EPERM) | not permitted: a path outside the allowed directories (`backup.root`), a key file with a refused kind, mode or owner |
| -2 (ENOENT), -13 (EACCES) | a key file does not exist or may not be opened (the open's errno, as SPDK answers) |
| -5 (EIO) | an I/O error on a device or file (a store, a backup, a configuration file), or a listener that cannot bind |
| -16 (EBUSY) | the object is in use (a bdev claimed or exported, a snapshot draining) |
| -17 (EEXIST) | an object of that name or id exists |
| -19 (ENODEV) | the named object (bdev, lvol store, target node, job, key) does not exist (a missing NVMe-oF subsystem is -32602, as in SPDK) |
| -22 (EINVAL) | the request does not fit the object (e.g. preserving a bdev that cannot be preserved) |
| -28 (ENOSPC) | no room: a store or pool is full, no free LUN id or target node slot |
| -110 (ETIMEDOUT) | a reactor did not answer in time, or sessions did not close in time |
| -114 (EALREADY) | the operation is already done or in progress |

## Methods
"
    );
    for (d, ms) in &mods {
        let links: Vec<String> = ms.iter().map(|m| format!("[`{0}`](#{0})", m.name)).collect();
        let _ = writeln!(o, "- **{}**: {}", d.name, links.join(", "));
    }
    for (d, ms) in &mods {
        let _ = writeln!(o, "\n## Module `{}`", d.name);
        for m in ms {
            let _ = writeln!(o, "\n### `{}`\n\n{}", m.name, m.summary);
            let p = params(m);
            if !p.doc.is_empty() {
                let _ = writeln!(o, "\n{}", p.doc);
            }
            if p.params.is_empty() {
                let _ = writeln!(o, "\nParameters: none{}.", if p.others_ignored { " (any given are ignored)" } else { "" });
            } else {
                let _ = writeln!(o, "\nParameters{}:\n", if p.others_ignored { " (fields not listed are ignored)" } else { "" });
                for a in &p.params {
                    let _ = write!(o, "- `{}` ({}, {}", a.name, a.ty, if a.required { "required" } else { "optional" });
                    if let Some(d) = &a.default {
                        let _ = write!(o, ", default `{d}`");
                    }
                    o.push(')');
                    if !a.doc.is_empty() {
                        let _ = write!(o, ": {}", a.doc);
                    }
                    o.push('\n');
                }
            }
            let errs = errors(m);
            if errs.is_empty() {
                let _ = writeln!(o, "\nErrors: {}.", if p.params.is_empty() { "none of its own" } else { "none beyond -32602 for bad parameters" });
            } else {
                let _ = writeln!(o, "\nErrors:\n");
                for (code, when) in errs {
                    let _ = writeln!(o, "- {}: {when}", code_label(code));
                }
            }
        }
    }
    o
}

/// `tidemark METHOD --help`.
pub fn method_help(m: &MethodDecl) -> String {
    let mut o = format!("{} (module {}): {}\n\nusage: tidemark [-s SOCKET] {} [--param value ...] [--json '{{...}}']\n", m.name, m.module, m.summary, m.name);
    let p = params(m);
    if !p.doc.is_empty() {
        let _ = writeln!(o, "\n{}", p.doc);
    }
    if p.params.is_empty() {
        o.push_str("\nparameters: none\n");
    } else {
        o.push_str("\nparameters:\n");
        let width = p.params.iter().map(|a| a.name.len()).max().unwrap_or(0) + 2;
        for a in &p.params {
            let mut what = format!("{}, {}", a.ty, if a.required { "required" } else { "optional" });
            if let Some(d) = &a.default {
                let _ = write!(what, ", default {d}");
            }
            let _ = writeln!(o, "  --{:width$} {what}", a.name);
            if !a.doc.is_empty() {
                let _ = writeln!(o, "  {:width$}   {}", "", a.doc);
            }
        }
        if p.others_ignored {
            o.push_str("  (other parameters are ignored)\n");
        }
    }
    o.push_str("\nerrors:\n");
    if !p.params.is_empty() {
        o.push_str("  -32602 (INVALID_PARAMS): bad parameters (missing, unknown or mistyped field, value out of range)\n");
    }
    let errs = errors(m);
    if errs.is_empty() && p.params.is_empty() {
        o.push_str("  none of its own\n");
    }
    for (code, when) in errs {
        let _ = writeln!(o, "  {}: {when}", code_label(code));
    }
    o
}

/// The method list of `tidemark --help`: by module, one line each.
pub fn method_list() -> String {
    let mods = modules();
    let width = mods.iter().flat_map(|(_, ms)| ms.iter().map(|m| m.name.len())).max().unwrap_or(0);
    let mut o = String::new();
    for (d, ms) in mods {
        let _ = writeln!(o, "\n{}:", d.name);
        for m in ms {
            let _ = writeln!(o, "  {:width$}  {}", m.name, m.summary);
        }
    }
    o
}

/// `rpc_get_methods {"detailed": true}`: each method with its module, summary, params' JSON
/// Schema and errors (`{code, when}`, -32602 for bad params left implied).
pub fn detailed(m: &MethodDecl) -> Value {
    let errors: Vec<Value> = errors(m).into_iter().map(|(code, when)| json!({ "code": code, "when": when })).collect();
    json!({ "name": m.name, "module": m.module, "summary": m.summary, "params": (m.params)().to_value(), "errors": errors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A nested object.
    #[derive(Deserialize, JsonSchema)]
    #[allow(dead_code)]
    struct Addr {
        traddr: String,
        #[serde(default)]
        trsvcid: Option<String>,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Fmt {
        Toml,
        Spdk,
    }

    /// Creates a thing.
    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        /// The number of blocks.
        num_blocks: u64,
        #[serde(default)]
        name: Option<String>,
        #[serde(default = "four")]
        depth: u32,
        #[serde(default)]
        fast: bool,
        listen_address: Addr,
        #[serde(default)]
        names: Vec<String>,
        format: Option<Fmt>,
    }

    fn four() -> u32 {
        4
    }

    fn ok(_: &super::super::Ctx, _: Option<Value>) -> Result<Value, crate::rpc::RpcError> {
        Ok(Value::Null)
    }

    #[test]
    fn a_params_struct_documents_names_types_requirement_defaults_and_docs() {
        let m = MethodDecl {
            name: "x_create",
            handler: ok,
            module: "x",
            summary: "s",
            params: schema_of::<P>,
            errors: &[&[(crate::rpc::ENODEV, "no x")], &[(crate::rpc::ENODEV, "no y"), (crate::rpc::EBUSY, "x is in use")]],
        };
        let p = params(&m);
        assert!(!p.others_ignored);
        assert_eq!(p.doc, "Creates a thing.");
        let row = |n: &str| p.params.iter().find(|a| a.name == n).unwrap_or_else(|| panic!("no {n} in {:?}", p.params));
        assert_eq!(
            *row("num_blocks"),
            Param { name: "num_blocks".into(), ty: "integer (uint64)".into(), required: true, default: None, doc: "The number of blocks.".into() }
        );
        assert!(!row("name").required && row("name").ty == "string" && row("name").default.is_none());
        assert_eq!(row("depth").default.as_deref(), Some("4"));
        assert_eq!(row("fast").default.as_deref(), Some("false"));
        assert!(row("listen_address").required && row("listen_address.traddr").required && !row("listen_address.trsvcid").required);
        assert_eq!(row("names").ty, "array of string");
        assert_eq!(row("format").ty, "\"toml\" | \"spdk\"");
        let help = method_help(&m);
        assert!(help.contains("--num_blocks") && help.contains("integer (uint64), required"), "{help}");
        // Sets merge by code, in the order declared; help prints them after the parameters.
        assert_eq!(errors(&m), vec![(-19, "no x; no y".to_string()), (-16, "x is in use".to_string())]);
        assert!(help.contains("-19 (ENODEV): no x; no y") && help.contains("-16 (EBUSY): x is in use") && help.contains("-32602"), "{help}");
        assert_eq!(detailed(&m)["errors"], json!([{"code": -19, "when": "no x; no y"}, {"code": -16, "when": "x is in use"}]));
    }

    #[test]
    fn a_params_map_reads_as_no_parameters_others_ignored() {
        let m = MethodDecl { name: "x_get", handler: ok, module: "x", summary: "s", params: schema_of::<serde_json::Map<String, Value>>, errors: &[] };
        let p = params(&m);
        assert!(p.params.is_empty() && p.others_ignored);
    }
}
