//! The `tidemark` CLI as a user meets it: help from the method table linked into the binary
//! (no daemon needed), methods listed by module, shell completions, and a quiet end when the
//! reader of its output goes away.

mod support;

use serde_json::json;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use support::*;

/// `tidemark args` with no daemon anywhere near (a socket path that does not exist).
fn cli(args: &[&str]) -> Output {
    Command::new(TIDEMARK).arg("-s").arg("/nonexistent/tidemark-cli-test.sock").args(args).output().expect("run tidemark")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn method_help_prints_the_parameters_without_a_daemon() {
    let o = cli(&["bdev_malloc_create", "--help"]);
    assert!(o.status.success(), "{o:?}");
    let h = stdout(&o);
    assert!(h.contains("Creates a bdev in memory."), "{h}");
    for line in ["--num_blocks", "--block_size"] {
        let l = h.lines().find(|l| l.trim_start().starts_with(line)).unwrap_or_else(|| panic!("no {line} in {h}"));
        assert!(l.contains("integer") && l.contains("required"), "{l}");
    }
    let name = h.lines().find(|l| l.trim_start().starts_with("--name ")).expect("--name");
    assert!(name.contains("optional"), "{name}");
    // Nested parameters read as the dotted names the CLI takes.
    let h = stdout(&cli(&["nvmf_subsystem_add_listener", "-h"]));
    assert!(h.contains("--listen_address.traddr"), "{h}");
    // The errors the method declares, after its parameters.
    let h = stdout(&cli(&["bdev_malloc_delete", "--help"]));
    let errors = h.split("\nerrors:\n").nth(1).unwrap_or_else(|| panic!("no errors in {h}"));
    assert!(errors.contains("-32602 (INVALID_PARAMS)") && errors.contains("-19 (ENODEV): the bdev does not exist") && errors.contains("-16 (EBUSY)"), "{h}");

    let o = cli(&["bdev_malloc_creat", "--help"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("did you mean bdev_malloc_create"), "{o:?}");
    let o = cli(&["backup", "start", "--help"]);
    assert!(o.status.success() && stdout(&o).contains("backup start"), "{o:?}");
}

#[test]
fn help_lists_the_methods_by_module() {
    let o = cli(&["--help"]);
    assert!(o.status.success(), "{o:?}");
    let h = stdout(&o);
    // Each method sits under its module's heading, with its summary.
    let mut module = "";
    let mut seen = Vec::new();
    for l in h.lines() {
        if let Some(m) = l.strip_suffix(':').filter(|m| !m.starts_with(' ') && !m.contains(' ')) {
            module = m;
        } else if let Some(rest) = l.strip_prefix("  ") {
            if let Some((name, summary)) = rest.split_once(' ') {
                seen.push((module.to_string(), name.to_string(), summary.trim().to_string()));
            }
        }
    }
    for (m, name) in
        [("malloc", "bdev_malloc_create"), ("nvmf", "nvmf_create_subsystem"), ("iscsi", "iscsi_create_target_node"), ("framework", "rpc_get_methods")]
    {
        let row = seen.iter().find(|(_, n, _)| n == name).unwrap_or_else(|| panic!("{name} not listed: {h}"));
        assert_eq!(row.0, m, "{name} listed under {} instead of {m}", row.0);
        assert!(!row.2.is_empty(), "{name} has no summary");
    }
    assert!(h.contains("usage: tidemark"), "{h}");
}

#[test]
fn completions_parse_and_complete_method_names_and_parameters() {
    let o = cli(&["completions", "bash"]);
    assert!(o.status.success(), "{o:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("tidemark.bash");
    std::fs::write(&script, &o.stdout).expect("write");
    let n = Command::new("bash").arg("-n").arg(&script).output().expect("bash");
    assert!(n.status.success(), "bash -n: {}", String::from_utf8_lossy(&n.stderr));
    // What a user gets on TAB: method names, then the method's parameters.
    let complete = |words: &str, cword: usize| {
        let prog = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             _tidemark tidemark \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let o = Command::new("bash").arg("-c").arg(prog).output().expect("bash");
        stdout(&o)
    };
    let names = complete("tidemark bdev_malloc_c", 1);
    assert!(names.split_whitespace().any(|w| w == "bdev_malloc_create"), "{names:?}");
    let params = complete("tidemark bdev_malloc_create --num", 2);
    assert!(params.split_whitespace().any(|w| w == "--num_blocks"), "{params:?}");

    for shell in ["zsh", "fish"] {
        let o = cli(&["completions", shell]);
        assert!(o.status.success() && stdout(&o).contains("bdev_malloc_create"), "{shell}: {o:?}");
    }
    assert_eq!(cli(&["completions", "tcsh"]).status.code(), Some(2));
}

/// Runs `tidemark args` with its stdout a pipe whose reader is already gone, as in
/// `tidemark ... | head -1` once head has exited.
fn with_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    Command::new(TIDEMARK).args(args).stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().expect("run tidemark")
}

fn assert_quiet_end(what: &str, o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && o.status.code() != Some(101), "{what} panicked on a closed pipe: {:?} {err}", o.status);
    // Ended by SIGPIPE, as `cat` is, or by an exit of its own.
    assert!(o.status.signal() == Some(libc::SIGPIPE) || o.status.code().is_some(), "{what}: {:?}", o.status);
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    for args in [&["--help"][..], &["bdev_malloc_create", "--help"], &["completions", "bash"], &["rpc-reference"]] {
        assert_quiet_end(&args.join(" "), &with_closed_pipe(args));
    }
    let d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 64, "block_size": 512}));
    let sock = d.socket.display().to_string();
    assert_quiet_end("bdev_get_bdevs", &with_closed_pipe(&["-s", &sock, "bdev_get_bdevs"]));
    // Calls keep working as before: `--param value` pairs, JSON values.
    let o = d.cli(&["bdev_malloc_create", "--name", "m1", "--num_blocks", "64", "--block_size", "512"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(d.rpc("bdev_get_bdevs", json!({"name": "m1"}))[0]["num_blocks"], 64);
}
