//! The hypervisor boundary: outside src/vmm nothing names a hypervisor or
//! its tools, comments and READMEs included, except the lines src/vmm/README.md
//! lists as deliberate. Reads files only: no daemon, no root.

use std::path::{Path, PathBuf};

/// Names that belong behind the `Vmm` trait (`qemu` covers `qemu-img`).
const NAMES: [&str; 3] = ["qemu", "qmp", "firecracker"];

/// One listed exception: in `file`, `fragment` may appear on a line.
#[derive(Debug)]
struct Exception {
    file: String,
    fragment: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The list under "## Exceptions to the boundary" in src/vmm/README.md:
/// lines like "- `src/x.rs` `the text`: why".
fn exceptions() -> Vec<Exception> {
    let readme = std::fs::read_to_string(root().join("src/vmm/README.md")).unwrap();
    let section = readme
        .split("\n## Exceptions to the boundary\n")
        .nth(1)
        .expect("src/vmm/README.md has a section \"## Exceptions to the boundary\"");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("- `"))
        .map(|l| {
            let parts: Vec<&str> = l.split('`').collect();
            assert!(
                parts.len() >= 5,
                "an exception names a file and a text: {l}"
            );
            Exception {
                file: parts[1].to_string(),
                fragment: parts[3].to_string(),
            }
        })
        .collect()
}

/// Every file under `dir`, as paths relative to the repository.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path.strip_prefix(root()).unwrap().to_path_buf());
        }
    }
}

/// Does `line` name a hypervisor once the `allowed` texts are taken out?
fn names_a_hypervisor(line: &str, allowed: &[&str]) -> bool {
    let mut rest = line.to_string();
    for a in allowed {
        rest = rest.replace(a, "");
    }
    let rest = rest.to_ascii_lowercase();
    NAMES.iter().any(|n| rest.contains(n))
}

#[test]
fn the_matcher_sees_every_spelling_and_only_what_is_not_allowed() {
    assert!(names_a_hypervisor("// so Qemu can open it", &[]));
    assert!(names_a_hypervisor("a QMP socket", &[]));
    assert!(names_a_hypervisor("what FireCracker takes", &[]));
    assert!(names_a_hypervisor("run qemu-img create", &[]));
    assert!(!names_a_hypervisor("so the VMM can open it", &[]));
    assert!(!names_a_hypervisor(
        "flatten it (qemu-img convert)",
        &["qemu-img convert"]
    ));
    // An allowed text covers itself, not a second name on the same line.
    assert!(names_a_hypervisor(
        "qemu-img convert, then QEMU",
        &["qemu-img convert"]
    ));
}

#[test]
fn nothing_outside_src_vmm_names_a_hypervisor() {
    let exceptions = exceptions();
    let mut files = vec![];
    files_under(&root().join("src"), &mut files);
    let mut leaks = vec![];
    let mut used = vec![false; exceptions.len()];
    let mut scanned_inside = 0;
    for file in &files {
        let name = file.to_string_lossy().into_owned();
        let text = String::from_utf8_lossy(&std::fs::read(root().join(file)).unwrap()).into_owned();
        if file.starts_with("src/vmm") {
            scanned_inside += text.lines().filter(|l| names_a_hypervisor(l, &[])).count();
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if !names_a_hypervisor(line, &[]) {
                continue;
            }
            let mine: Vec<usize> = (0..exceptions.len())
                .filter(|i| exceptions[*i].file == name && line.contains(&exceptions[*i].fragment))
                .collect();
            let allowed: Vec<&str> = mine
                .iter()
                .map(|i| exceptions[*i].fragment.as_str())
                .collect();
            if names_a_hypervisor(line, &allowed) {
                leaks.push(format!("{name}:{}: {}", n + 1, line.trim()));
            } else {
                for i in mine {
                    used[i] = true;
                }
            }
        }
    }
    // The scan itself works: src/vmm does name its backend.
    assert!(
        scanned_inside > 0,
        "no hypervisor name found even in src/vmm"
    );
    assert!(
        leaks.is_empty(),
        "hypervisor names outside src/vmm (reword them, say \"the VMM\", or list a deliberate \
         exception in src/vmm/README.md):\n{}",
        leaks.join("\n")
    );
    let stale: Vec<String> = exceptions
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(e, _)| format!("{} `{}`", e.file, e.fragment))
        .collect();
    assert!(
        stale.is_empty(),
        "exceptions in src/vmm/README.md that match no line any more (remove them):\n{}",
        stale.join("\n")
    );
}
