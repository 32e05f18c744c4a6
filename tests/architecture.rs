//! The crate's layering, read from the source: which top-level module (`src/<m>/`, `src/<m>.rs`,
//! `bdevs/` for `bdevs`) names which other through `crate::<m>` paths (`use crate::x::...`,
//! `use crate::{x, y}`, `crate::x::f()`), test code (`#[cfg(test)]` items) left out.
//!
//! Two rules (issue #20): only the composition roots import `target` (modules receive a
//! `module::Ctx`), and the modules below the roots form no import cycle, so each can be read,
//! built on and replaced knowing only the layers under it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What starts a target: the only modules that may import `target` (and the ones allowed to
/// import anything). `bin` stands for the programs in src/bin.
const ROOTS: &[&str] = &["target", "daemon", "fuzz", "sim", "bin"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("source folder is readable") {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments and without `#[cfg(test)]` items (a test module may use
/// whatever it tests with).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            // Skip the item: to its `;` or its closing brace.
            let mut depth = 0i32;
            let mut opened = false;
            for l in lines.by_ref() {
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                opened |= l.contains('{');
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        let line = match line.find("// ") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level modules named after `crate::` in `code` (`prefix` is `crate::`, or
/// `tidemark::` in the programs).
fn named(code: &str, prefix: &str, tops: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            items.push(item);
            found.extend(items.iter().map(|s| s.trim().split("::").next().unwrap_or("").trim().to_string()));
        } else {
            found.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    found.retain(|m| tops.contains(m));
    found
}

/// module -> (module it names -> a file that names it).
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("src/lib.rs");
    let tops: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    assert!(tops.contains("target") && tops.contains("bdevs") && tops.len() > 10, "lib.rs lists the top-level modules: {tops:?}");
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("bdevs"), &mut files);
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(root).expect("under the crate").to_string_lossy().into_owned();
        let (module, prefix) = match rel.split('/').collect::<Vec<_>>().as_slice() {
            ["bdevs", ..] => ("bdevs".to_string(), "crate::"),
            ["src", "lib.rs"] => continue,
            ["src", "bin", ..] => ("bin".to_string(), "tidemark::"),
            ["src", m, ..] => (m.trim_end_matches(".rs").to_string(), "crate::"),
            _ => continue,
        };
        let text = std::fs::read_to_string(&f).expect("source file is readable");
        for to in named(&code(&text), prefix, &tops) {
            if to != module {
                g.entry(module.clone()).or_default().entry(to).or_insert_with(|| rel.clone());
            }
        }
    }
    g
}

/// A cycle among `nodes` in `g`, as a path `a -> b -> ... -> a` with a file per edge.
fn find_cycle(g: &BTreeMap<String, BTreeMap<String, String>>, nodes: &BTreeSet<String>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeMap<String, String>>,
        nodes: &BTreeSet<String>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for (m, file) in g.get(n).into_iter().flatten() {
            if !nodes.contains(m) {
                continue;
            }
            match state.get(m.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == m).expect("on the path");
                    let mut cycle: Vec<String> = path[start..].to_vec();
                    cycle.push(m.clone());
                    // Name the file of each edge.
                    let steps = cycle.windows(2).map(|w| format!("{} -> {} ({})", w[0], w[1], g[&w[0]][&w[1]])).collect();
                    let _ = file;
                    return Some(steps);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, g, nodes, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in nodes {
        if !state.contains_key(n.as_str()) {
            let mut path = Vec::new();
            if let Some(c) = visit(n, g, nodes, &mut state, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn only_the_composition_roots_import_target() {
    let g = graph();
    let importers: Vec<String> =
        g.iter().filter(|(m, to)| to.contains_key("target") && !ROOTS.contains(&m.as_str())).map(|(m, to)| format!("{m} ({})", to["target"])).collect();
    assert!(importers.is_empty(), "modules import the composition root `target` (they should take a module::Ctx): {importers:?}");
}

#[test]
fn the_modules_below_the_roots_form_no_import_cycle() {
    let g = graph();
    let nodes: BTreeSet<String> = g.keys().chain(g.values().flat_map(|t| t.keys())).filter(|m| !ROOTS.contains(&m.as_str())).cloned().collect();
    if let Some(c) = find_cycle(&g, &nodes) {
        panic!("import cycle between modules:\n  {}", c.join("\n  "));
    }
}

#[test]
fn the_graph_reader_sees_uses_and_paths_but_not_comments_or_tests() {
    let tops: BTreeSet<String> = ["bdev", "rpc", "target", "reactor", "config"].iter().map(|s| s.to_string()).collect();
    let src = "use crate::bdev::Bdev;\n// use crate::target::Target;\nuse crate::{rpc::RpcError, config::{A, B}};\nfn f() { crate::reactor::now_ns(); $crate::target::x(); }\n#[cfg(test)]\nmod tests {\n    use crate::target::Target;\n}\n";
    let found = named(&code(src), "crate::", &tops);
    assert_eq!(found.into_iter().collect::<Vec<_>>(), ["bdev", "config", "reactor", "rpc"]);
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeMap::from([("b".to_string(), "a.rs".to_string())]));
    g.insert("b".to_string(), BTreeMap::from([("a".to_string(), "b.rs".to_string())]));
    let nodes: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    assert!(find_cycle(&g, &nodes).is_some());
}

/// The `impl Bdev for ...` blocks of `text` that write a getter of the bdev's data themselves,
/// as "Type: fn".
fn own_getters(text: &str) -> Vec<String> {
    const GETTERS: &[&str] = &["fn name(", "fn product_name(", "fn block_size(", "fn num_blocks(", "fn uuid("];
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("impl Bdev for ") else { continue };
        let ty = rest.trim_end_matches(|c: char| c == '{' || c.is_whitespace()).to_string();
        let mut depth = line.matches('{').count() as i32 - line.matches('}').count() as i32;
        for l in lines.by_ref() {
            if depth == 1 {
                found.extend(GETTERS.iter().filter(|g| l.trim_start().starts_with(*g)).map(|g| format!("{ty}: {}", g.trim_end_matches('('))));
            }
            depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
            if depth <= 0 {
                break;
            }
        }
    }
    found
}

/// Issue #20: a bdev's data (name, product name, block size and count, UUID) is its
/// `BdevProps`, returned by `Bdev::props`; the trait's getters read it. A module that writes a
/// getter again keeps a second copy of the data that can disagree with the first.
#[test]
fn bdev_modules_give_their_data_as_props_not_getters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in ["src", "bdevs", "tests/modules"] {
        rust_files(&root.join(d), &mut files);
    }
    let mut offenders = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("source file is readable");
        offenders.extend(own_getters(&text).into_iter().map(|o| format!("{} ({o})", f.strip_prefix(root).unwrap_or(&f).display())));
    }
    assert!(offenders.is_empty(), "bdev modules that write getters of BdevProps data (return it from `props` instead): {offenders:?}");
    let sample = "impl Bdev for X {\n    fn props(&self) -> &BdevProps {\n        &self.p\n    }\n    fn uuid(&self) -> Uuid {\n        self.u\n    }\n}\nimpl Other for X {\n    fn name(&self) -> &str { \"x\" }\n}\n";
    assert_eq!(own_getters(sample), ["X: fn uuid"]);
}
