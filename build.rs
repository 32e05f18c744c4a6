// Records the commit the binary was built from, for the `tidemark_build_info` metric and
// `spdk_get_version`. Nothing else happens at build time.
use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=TIDEMARK_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    // Rebuild when HEAD moves. In a worktree `.git` is a file, so ask git where HEAD and the
    // refs live, and name only paths that exist (a missing one would rebuild every time).
    for (flag, file) in [("--git-dir", "HEAD"), ("--git-common-dir", "refs"), ("--git-common-dir", "packed-refs")] {
        if let Some(dir) = git(&["rev-parse", flag]) {
            let p = PathBuf::from(dir).join(file);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}
