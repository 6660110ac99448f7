//! Two rules of the source layout, checked by reading the source (no
//! binaries, a few milliseconds):
//!
//! - **no import cycles** between the modules of a crate: a module may use
//!   its ancestors and descendants (a facade and its parts), but two
//!   modules that are not nested must not reach each other, directly or
//!   round a circle. A cycle is how a context every module reaches into
//!   (and that reaches back) starts.
//! - **no function over [`MAX_LINES`] lines without a stated reason** in
//!   the product's crates: a longer one becomes a dispatch of named steps,
//!   or says why it stays whole in a comment line starting
//!   `// Long function:` just above it.
//!
//! Test code (`tests.rs`, `tests/` folders, a file's trailing
//! `#[cfg(test)] mod tests`) is not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 80;
const CRATES: &[&str] = &["shared", "primary", "standby", "coord", "tests"];
/// The length rule covers the product; the tests crate's demo, benchmark
/// sections and fault scenarios are scripts read top to bottom.
const PRODUCT: &[&str] = &["shared", "primary", "standby", "coord"];
const REASON: &str = "// Long function:";

/// One source file: its module path in the crate and its text (test code
/// removed).
struct Module {
    path: Vec<String>,
    text: String,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The library modules of one crate (binaries' roots and test files left
/// out: a binary is a root nothing imports).
fn modules(krate: &str) -> Vec<Module> {
    let src = workspace().join(krate).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let mut path: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if path.first().is_some_and(|c| c == "bin") {
            continue;
        }
        if matches!(
            path.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            path.pop();
        }
        if path.iter().any(|c| c == "tests" || c.ends_with("_tests")) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        out.push(Module { path, text });
    }
    out
}

/// The longest prefix of `parts` that names a module of the crate.
fn resolve(parts: &[String], known: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=parts.len())
        .rev()
        .map(|k| parts[..k].to_vec())
        .find(|p| known.contains(p))
}

/// The modules `m` refers to: every `crate::a::b` path, `crate::{a, b::c}`
/// group and `super::x` path outside comments.
fn references(m: &Module, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let path_at = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| p.trim().to_owned())
            .take_while(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
            .collect()
    };
    for line in m.text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                for item in group.split(',') {
                    out.extend(resolve(&path_at(item), known));
                }
            } else {
                out.extend(resolve(&path_at(rest), known));
            }
        }
        for (i, _) in code.match_indices("super::") {
            if i > 0 && code[..i].ends_with("::") {
                continue;
            }
            // `super` of `a/b.rs` and of `a/b/mod.rs` alike is `a`.
            let mut base = m.path.clone();
            base.pop();
            base.extend(path_at(&code[i + "super::".len()..]));
            out.extend(resolve(&base, known));
        }
    }
    let nested = |a: &[String], b: &[String]| a.starts_with(b) || b.starts_with(a);
    out.retain(|t| !nested(t, &m.path));
    out
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<Vec<String>, usize>,
        low: BTreeMap<Vec<String>, usize>,
        stack: Vec<Vec<String>>,
        found: Vec<Vec<String>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: &Vec<String>) {
            let n = self.index.len();
            self.index.insert(v.clone(), n);
            self.low.insert(v.clone(), n);
            self.stack.push(v.clone());
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    let done = &w == v;
                    comp.push(w.join("::"));
                    if done {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.found.push(comp);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let mut found = Vec::new();
    for krate in CRATES {
        let mods = modules(krate);
        let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
        let edges: BTreeMap<_, _> = mods
            .iter()
            .map(|m| (m.path.clone(), references(m, &known)))
            .collect();
        for c in cycles(&edges) {
            found.push(format!("{krate}: {}", c.join(" ⇄ ")));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// The functions of a file longer than [`MAX_LINES`] with no stated
/// reason: (name, first line, lines). rustfmt puts a function's closing
/// brace at its own indentation, which is how its end is found.
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let mut rest = trimmed;
        for prefix in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
        ] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
        }
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with(';') {
            continue;
        }
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        let Some(end) = lines[i + 1..].iter().position(|l| *l == close) else {
            continue;
        };
        let len = end + 2;
        let reasoned = lines[..i]
            .iter()
            .rev()
            .take_while(|l| {
                let t = l.trim_start();
                t.starts_with("//") || t.starts_with("#[")
            })
            .any(|l| l.trim_start().starts_with(REASON));
        if len > MAX_LINES && !reasoned {
            out.push((name, i + 1, len));
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_the_limit_without_a_stated_reason() {
    let mut found = Vec::new();
    for krate in PRODUCT {
        let src = workspace().join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        for file in files {
            let rel = file.strip_prefix(workspace()).expect("in the workspace");
            let comps: Vec<String> = file
                .strip_prefix(&src)
                .expect("under src")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if comps
                .iter()
                .any(|c| c == "tests" || c == "tests.rs" || c.ends_with("_tests.rs"))
            {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("readable source");
            let text = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            for (name, line, len) in long_functions(text) {
                found.push(format!("{}:{line} fn {name}: {len} lines", rel.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "functions over {MAX_LINES} lines without a `{REASON}` comment:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // A cycle of two modules is found, nesting is not a cycle.
    let a = vec!["a".to_owned()];
    let b = vec!["b".to_owned()];
    let ab = vec!["a".to_owned(), "b".to_owned()];
    let edges = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([a.clone()])),
        (ab.clone(), BTreeSet::new()),
    ]);
    assert_eq!(cycles(&edges), vec![vec!["a".to_owned(), "b".to_owned()]]);
    // The references of real modules are found: the mirror's log writer
    // is used by the state, a child of `follow` reaches `mirror`.
    let mods = modules("standby");
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    let refs = |path: &[&str]| {
        let m = mods
            .iter()
            .find(|m| m.path == path)
            .expect("the module exists");
        references(m, &known)
    };
    let logwriter = vec!["mirror".to_owned(), "logwriter".to_owned()];
    assert!(refs(&["state"]).contains(&logwriter));
    assert!(refs(&["follow", "applier"]).contains(&vec!["mirror".to_owned()]));
    // A long function is found, unless it says why.
    let body = "    x();\n".repeat(MAX_LINES);
    let long = format!("fn f() {{\n{body}}}\n");
    assert_eq!(long_functions(&long).len(), 1);
    let reasoned = format!("{REASON} a table\nfn f() {{\n{body}}}\n");
    assert!(long_functions(&reasoned).is_empty());
}

/// Every `BDB-NOTES.md §N` a source file cites is a numbered section of
/// `docs/BDB-NOTES.md` (the measured facts live in the repository).
#[test]
fn every_cited_bdb_note_exists() {
    let notes = std::fs::read_to_string(workspace().join("docs/BDB-NOTES.md")).expect("notes");
    let mut missing = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate).join("src"), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            for (i, _) in text.match_indices("BDB-NOTES.md §") {
                let n: String = text[i + "BDB-NOTES.md §".len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if !notes.contains(&format!("\n## §{n}. ")) {
                    missing.push(format!("{}: §{n}", file.display()));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited but not in docs/BDB-NOTES.md:\n{}",
        missing.join("\n")
    );
}
