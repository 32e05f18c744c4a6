//! The one way the node plugin runs external tools (nvme-cli, mkfs, mount, resize2fs, ...):
//! bounded in time, stdout and stderr captured, a failure turned into a gRPC status that names
//! the command and carries its stderr. No request field that may hold a secret is ever passed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Status;

#[derive(Debug)]
pub struct Output {
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// The executable `prog` on PATH (or the path itself when it has a slash).
pub fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Path::new(prog).is_file().then(|| PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(prog)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn command_line(prog: &str, args: &[&str]) -> String {
    std::iter::once(prog).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}

/// Runs `prog args` and waits at most `timeout` (then kills it). Err only when it could not
/// run or ran out of time; a non-zero exit is an Ok with its code.
pub fn run(prog: &str, args: &[&str], timeout: Duration) -> Result<Output, Status> {
    let line = command_line(prog, args);
    log::debug!("running {line}");
    let mut child =
        Command::new(prog).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).env("LC_ALL", "C").spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Status::failed_precondition(format!("{prog} is not installed on this node (needed for `{line}`)"))
            } else {
                Status::internal(format!("{line}: {e}"))
            }
        })?;
    let reader = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped")));
    let err = reader(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Status::deadline_exceeded(format!("`{line}` did not finish in {} s and was killed", timeout.as_secs())));
            }
            Err(e) => return Err(Status::internal(format!("{line}: {e}"))),
        }
    };
    Ok(Output { code: status.code(), stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// Runs `prog args`; a non-zero exit is an INTERNAL error with the command and its stderr.
pub fn check(prog: &str, args: &[&str], timeout: Duration) -> Result<Output, Status> {
    let o = run(prog, args, timeout)?;
    if o.ok() {
        return Ok(o);
    }
    Err(Status::internal(failure(prog, args, &o)))
}

/// "`cmd` exited with N: stderr" (stdout when stderr is empty), trimmed to a readable length.
pub fn failure(prog: &str, args: &[&str], o: &Output) -> String {
    let text = if o.stderr.trim().is_empty() { o.stdout.trim() } else { o.stderr.trim() };
    let mut text: String = text.chars().take(2000).collect();
    if text.is_empty() {
        text = "(no output)".into();
    }
    let how = o.code.map_or_else(|| "was killed by a signal".to_string(), |c| format!("exited with {c}"));
    format!("`{}` {how}: {text}", command_line(prog, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_timeout() {
        let o = run("sh", &["-c", "echo out; echo err >&2; exit 3"], Duration::from_secs(10)).unwrap();
        assert_eq!((o.code, o.stdout.as_str(), o.stderr.as_str()), (Some(3), "out\n", "err\n"));
        let e = check("sh", &["-c", "echo 'it broke' >&2; exit 1"], Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.message().contains("it broke") && e.message().contains("exited with 1"), "{}", e.message());
        let t = Instant::now();
        let e = run("sleep", &["5"], Duration::from_millis(200)).err().unwrap();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(run("/nonexistent/tool", &[], Duration::from_secs(1)).err().unwrap().code(), tonic::Code::FailedPrecondition);
        assert!(which("sh").is_some() && which("no-such-tool-here").is_none());
    }
}
