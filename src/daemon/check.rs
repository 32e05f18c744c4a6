//! `tidemarkd --check-config`: every RPC call of a configuration run against a scratch target
//! (see `config::check` for what the scratch target does differently, and the guards the
//! handlers call). Here, the composition root's part: start the scratch target, run the calls,
//! name each one rejected by its key.

use crate::config::Config;
use std::path::{Path, PathBuf};

/// One call the check rejected: its key (`bdev[2]`, `bdev[0].method`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub key: String,
    pub method: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key `{}` ({}): {}", self.key, self.method, self.message)
    }
}

/// Checks `config` (already parsed, so its settings are valid): first that every method
/// exists, then every call in order against a scratch target. Returns the number of calls
/// checked, or every problem found (a call that fails is skipped, so the calls that refer to
/// what it would have made report too: those are real consequences of the same mistake).
pub fn check(config: &Config) -> Result<usize, Vec<Problem>> {
    let known: Vec<&str> = crate::module::declared().iter().flat_map(|d| d.methods.iter().map(|m| m.name)).collect();
    let mut problems = Vec::new();
    let mut calls = 0;
    for (section, list) in config.sections() {
        for (i, call) in list.iter().enumerate() {
            calls += 1;
            if !known.contains(&call.method.as_str()) {
                let hint = closest(&call.method, &known).map(|m| format!(" (did you mean {m}?)")).unwrap_or_default();
                problems.push(Problem { key: format!("{section}[{i}].method"), method: call.method.clone(), message: format!("unknown method{hint}") });
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let scratch = scratch_dir().map_err(|e| vec![Problem { key: "daemon.data_dir".into(), method: "-".into(), message: e }])?;
    let result = run_calls(config, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| calls)
}

fn run_calls(config: &Config, scratch: &Path) -> Result<(), Vec<Problem>> {
    let setup = |message: String| vec![Problem { key: "reactor".into(), method: "-".into(), message }];
    crate::config::check::begin(&config.daemon.data_dir, scratch);
    let mut c = config.clone();
    c.daemon.data_dir = scratch.join("data");
    c.metrics.listen = String::new();
    c.rpc.socket = scratch.join("unused.sock");
    // The check holds no host I/O: the smallest pool does.
    c.daemon.buffer_pool_mb = 1;
    let (reactors, target) = crate::daemon::start_target(c).map_err(setup)?;
    let mut problems = Vec::new();
    for (section, calls) in target.config.sections() {
        for (i, call) in calls.iter().enumerate() {
            let params = if call.params.is_null() { None } else { Some(call.params.clone()) };
            if let Err(e) = target.call_from_config(&call.method, params) {
                problems.push(Problem { key: format!("{section}[{i}]"), method: call.method.clone(), message: e.message });
            }
        }
    }
    target.shutdown();
    reactors.stop();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A fresh private directory for the scratch target.
fn scratch_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let dir = base.join(format!("tidemarkd-check-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create a scratch directory in {}: {e}", base.display())),
        }
    }
    Err(format!("cannot create a scratch directory in {}", base.display()))
}

/// The method nearest to a misspelt one, if it is near enough to be what was meant.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (strsim::damerau_levenshtein(name, k), *k)).filter(|(d, _)| *d <= 3).min().map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_method_is_matched_to_the_one_meant() {
        let known = ["bdev_malloc_create", "bdev_malloc_delete", "bdev_null_create"];
        assert_eq!(closest("bdev_malloc_creat", &known), Some("bdev_malloc_create"));
        assert_eq!(closest("nvmf_make_everything", &known), None);
    }
}
