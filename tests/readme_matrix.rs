//! The README's policy x scenario table is what `tdxfuzz matrix` prints now.

#[test]
fn readme_matrix_matches_a_fresh_run() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tdxfuzz"))
        .args(["matrix", "--dir", &format!("{root}/corpus/regressions")])
        .output()
        .expect("run tdxfuzz matrix");
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    assert!(
        readme.contains(&table),
        "README.md is out of date; paste the output of `tdxfuzz matrix`:\n{table}"
    );
}
