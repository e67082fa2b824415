//! Reading scenario files: the text form, or raw fuzz input (any bytes decode).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use harness::scenario::{decode::decode, text::parse, Scenario};

/// A scenario read from a file, or the reason it is bad input (exit code 2).
pub enum Loaded {
    Ok(Scenario),
    Bad(String),
}

/// Text scenarios start with `vcpus` (after comments); anything else is a raw fuzz input.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(load_bytes(&path.display().to_string(), &bytes))
}

pub fn load_bytes(name: &str, bytes: &[u8]) -> Loaded {
    match std::str::from_utf8(bytes) {
        Ok(text) if looks_like_text(text) => match parse(text) {
            Ok(s) => Loaded::Ok(s),
            Err(e) => Loaded::Bad(format!("{name}: {e}")),
        },
        _ => Loaded::Ok(decode(bytes)),
    }
}

/// True if `bytes` are a text scenario (not a raw input).
pub fn is_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(looks_like_text)
}

fn looks_like_text(t: &str) -> bool {
    t.lines()
        .map(|l| l.trim())
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with("vcpus"))
}

/// Every `*.tdx` file under `dir`, sorted.
pub fn scenario_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tdx"))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(anyhow!("no .tdx scenarios in {}", dir.display()));
    }
    Ok(v)
}
