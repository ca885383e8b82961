//! The host crate's modules form no import circle: a module never reaches, through
//! `crate::…` paths, a module that reaches it back.
//!
//! Run it alone with `cargo test -p vmplug --test import_graph`; on failure it
//! prints the circle and, for each of its edges, the line that makes it.
//!
//! The graph's nodes are the crate's top-level modules (`lib.rs`'s `pub mod`s; a
//! directory module and its files are one node); an edge is any `crate::NAME`
//! in a module's production code (`use` lines, paths in expressions, use trees
//! such as `crate::{a, b::C}`). Comments and `#[cfg(test)]` items are left out:
//! test code may reach anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where a top-level module's source lives: `src/NAME.rs`, or every file under `src/NAME/`.
fn module_files(src: &Path, name: &str) -> Vec<PathBuf> {
    let file = src.join(format!("{name}.rs"));
    let mut files = vec![];
    if file.is_file() {
        files.push(file);
    }
    let dir = src.join(name);
    if dir.is_dir() {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("readable source directory") {
                let p = entry.expect("directory entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    files
}

/// The top-level modules `lib.rs` declares.
fn modules(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').trim().to_string())
        })
        .collect()
}

/// The lines of production code: comment lines and `#[cfg(test)]` items dropped
/// (an item ends at its `;` or where its braces balance). Each kept line keeps its number.
fn production_lines(text: &str) -> Vec<(usize, &str)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = vec![];
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim();
        if t == "#[cfg(test)]" {
            let mut depth = 0i64;
            let mut opened = false;
            let mut j = i + 1;
            while j < lines.len() {
                let l = lines[j];
                depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
                opened |= l.contains('{');
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            i = j + 1;
            continue;
        }
        if !t.starts_with("//") {
            kept.push((i + 1, lines[i]));
        }
        i += 1;
    }
    kept
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The first segments after each `crate::` on a line (a use tree's braces give several).
fn crate_targets(line: &str) -> Vec<String> {
    let mut out = vec![];
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        // `vmplug_common::…` or `some_crate::…` end in "crate::" too; only a whole word counts.
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(tree) = after.strip_prefix('{') {
            let mut depth = 1;
            let mut start = true;
            for (k, c) in tree.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => start = true,
                    c if start && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                        out.push(ident_at(&tree[k..]).to_string());
                        start = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
        } else {
            let id = ident_at(after);
            if !id.is_empty() {
                out.push(id.to_string());
            }
        }
    }
    out
}

/// Every edge between two top-level modules, with the first line that makes it.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn graph(src: &Path) -> Graph {
    let names = modules(src);
    assert!(names.len() > 5, "lib.rs declares the crate's modules: found {names:?}");
    let known: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let mut g = Graph::new();
    for m in &names {
        let edges = g.entry(m.clone()).or_default();
        for file in module_files(src, m) {
            let text = std::fs::read_to_string(&file).expect("readable source file");
            for (n, line) in production_lines(&text) {
                for t in crate_targets(line) {
                    if t != *m && known.contains(t.as_str()) {
                        let rel = file.strip_prefix(src).unwrap_or(&file).display();
                        edges.entry(t).or_insert_with(|| format!("src/{rel}:{n}: {}", line.trim()));
                    }
                }
            }
        }
    }
    g
}

/// One circle of the graph, as the path that closes it, if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(g: &Graph, v: &str, marks: &mut BTreeMap<String, Mark>, path: &mut Vec<String>) -> Option<Vec<String>> {
        marks.insert(v.to_string(), Mark::Open);
        path.push(v.to_string());
        for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
            match marks.get(w).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = path.iter().position(|p| p == w).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(g, w, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(v.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for v in g.keys() {
        if marks.get(v).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(g, v, &mut marks, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_host_crate_has_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    if let Some(cycle) = find_cycle(&g) {
        let mut why = String::new();
        for pair in cycle.windows(2) {
            why.push_str(&format!("  {} → {}: {}\n", pair[0], pair[1], g[&pair[0]][&pair[1]]));
        }
        panic!("import circle: {}\n{why}", cycle.join(" → "));
    }
}

#[test]
fn the_checker_sees_paths_use_trees_and_circles() {
    assert_eq!(crate_targets("use crate::xml::{A, B};"), ["xml"]);
    assert_eq!(crate_targets("use crate::{a::X, b, c::{d, e}};"), ["a", "b", "c"]);
    assert_eq!(crate_targets("let x = crate::ops::ms(t) + crate::report::f();"), ["ops", "report"]);
    assert!(crate_targets("use vmplug_common::size;").is_empty());
    let src = "fn a() {}\n#[cfg(test)]\nmod tests {\n    use crate::x;\n}\n// crate::y\nuse crate::z;\n";
    let kept: Vec<usize> = production_lines(src).iter().map(|(n, _)| *n).collect();
    assert_eq!(kept, [1, 7]);
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().insert(b.into(), String::new());
    }
    assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    g.get_mut("c").map(|e| e.remove("a"));
    assert_eq!(find_cycle(&g), None);
}
