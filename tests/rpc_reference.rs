//! docs/rpc.md cannot drift from the methods tidemarkd serves: it must name exactly the methods
//! `rpc_get_methods` of a running tidemarkd lists, document each one's parameters, and equal
//! what `tidemark rpc-reference` generates from the method table linked into the binaries.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
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
