//! The library's modules form layers whose imports run one way (ARCHITECTURE.md): no top-level
//! module of src/ reaches, through `crate::` paths, a module that reaches it back. The same
//! reading of the sources as `scripts/module_deps.py` (code and tests, comments left out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the files it is made of (`main.rs` and `lib.rs` are the top, left out).
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut mods = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            let mut files = Vec::new();
            rust_files(&p, &mut files);
            mods.insert(name, files);
        } else if p.extension().is_some_and(|e| e == "rs") && name != "main" && name != "lib" {
            mods.insert(name, vec![p]);
        }
    }
    mods
}

/// The top-level modules named after `crate::` in `text` (also inside `crate::{a, b::c}`).
fn referenced(text: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let heads: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|part| part.trim().split("::").next().unwrap_or("").trim())
                .collect()
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            vec![&rest[..end]]
        };
        found.extend(
            heads
                .into_iter()
                .filter(|h| names.contains(*h))
                .map(String::from),
        );
    }
    found
}

fn code_without_comments(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" //").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_module_of_src_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, files) in &mods {
        let mut to = BTreeSet::new();
        for f in files {
            to.extend(referenced(&code_without_comments(f), &names));
        }
        to.remove(m);
        edges.insert(m.clone(), to);
    }
    // The layers ARCHITECTURE.md draws, as a sanity check of the reading itself.
    assert!(edges["engine"].contains("train") && edges["classify"].contains("engine"));
    assert!(
        edges["config"].is_empty(),
        "config imports {:?}",
        edges["config"]
    );
    // A cycle: a module reachable from one of the modules it imports.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            for n in &edges[&m] {
                if seen.insert(n.clone()) {
                    stack.push(n.clone());
                }
            }
        }
        seen
    };
    let cycles: Vec<String> = names
        .iter()
        .filter(|m| reach(m).contains(*m))
        .map(|m| format!("{m} -> {:?}", edges[m]))
        .collect();
    assert!(cycles.is_empty(), "import cycles through: {cycles:#?}");
}
