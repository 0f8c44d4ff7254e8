//! The daemons' command lines, run as real processes: `--check` accepts the
//! shipped examples and good fixtures, and names file, line and key for bad ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn binary_for(file: &Path) -> &'static str {
    let name = file.file_name().unwrap().to_string_lossy();
    if name.starts_with("client") {
        env!("CARGO_BIN_EXE_tunnel-client")
    } else {
        env!("CARGO_BIN_EXE_tunnel-server")
    }
}

fn check(file: &Path) -> (i32, String, String) {
    let out = Command::new(binary_for(file)).arg("--config").arg(file).arg("--check").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

/// The shipped examples and every good fixture pass `--check` with exit 0.
#[test]
fn good_configs_pass_check() {
    let mut files = toml_files(&root().join("tests/fixtures/good"));
    files.push(root().join("config/server.toml"));
    files.push(root().join("config/client.toml"));
    assert!(files.len() >= 4, "fixtures found: {files:?}");
    for f in files {
        let (code, stdout, stderr) = check(&f);
        assert_eq!(code, 0, "{}: {stderr}", f.display());
        assert!(stdout.contains(": OK"), "{}: {stdout}", f.display());
    }
}

/// Every bad fixture fails `--check` with exit 2 and the message its first line expects.
#[test]
fn bad_configs_name_file_line_and_key() {
    let files = toml_files(&root().join("tests/fixtures/bad"));
    assert!(files.len() >= 8, "fixtures found: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("first line: # expect: ...");
        let (code, _, stderr) = check(&f);
        assert_eq!(code, 2, "{}: {stderr}", f.display());
        assert!(stderr.contains(expect), "{}:\n got: {stderr}\nwant: {expect}", f.display());
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

/// A missing file is a clear error, not a panic.
#[test]
fn missing_config_file_is_reported() {
    let (code, _, stderr) = check(Path::new("/nonexistent/server.toml"));
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/server.toml: cannot read"), "{stderr}");
}

/// `config push --check` accepts groups and rules, refuses a file with a
/// server's own sections naming file, line and key, and a push without a
/// clustered --config says what it needs; nothing reaches etcd in any of these.
#[test]
fn config_push_checks_first() {
    let push = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tunnel-server")).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let fixture = |name: &str| root().join("tests/fixtures/push").join(name).display().to_string();
    let (code, stdout, _) = push(&["config", "push", "--check", &fixture("fleet.toml")]);
    assert_eq!(code, 0);
    assert!(stdout.contains("fleet.toml: OK (1 groups, 2 rules)"), "{stdout}");
    let (code, _, stderr) = push(&["config", "push", "--check", &fixture("with-server.toml")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("with-server.toml:1: server: unknown field `server`"), "{stderr}");
    let minimal = root().join("tests/fixtures/good/server-minimal.toml").display().to_string();
    let (code, _, stderr) = push(&["--config", &minimal, "config", "push", &fixture("fleet.toml")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("has no [cluster] section"), "{stderr}");
}
