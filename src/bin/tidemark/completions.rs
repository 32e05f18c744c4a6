//! `tidemark completions bash|zsh|fish`: the command line described to clap_complete, each RPC
//! method a subcommand with its parameters as options, from the linked method table. clap only
//! describes here; the arguments themselves are parsed by hand (values are JSON or strings,
//! dotted names nest), which clap's model does not fit.

use clap::{Arg, ArgAction, Command, ValueHint};
use clap_complete::Shell;
use tidemark::module::reference;

pub fn main(args: &[String]) {
    let shell = match args.first().map(String::as_str) {
        Some("bash") => Shell::Bash,
        Some("zsh") => Shell::Zsh,
        Some("fish") => Shell::Fish,
        _ => super::fail(2, "usage: tidemark completions bash|zsh|fish"),
    };
    clap_complete::generate(shell, &mut command(), "tidemark", &mut std::io::stdout());
}

fn flag(name: &'static str) -> Arg {
    Arg::new(name).long(name).action(ArgAction::SetTrue)
}

fn option(name: impl Into<String>, value: &'static str) -> Arg {
    let name = name.into();
    Arg::new(name.clone()).long(name).value_name(value)
}

/// `method`'s parameters as options (`--json` too); rows inside arrays are left out: the CLI
/// sets an array whole (`--luns '[...]'`).
fn method_options(method: &tidemark::module::MethodDecl) -> Vec<Arg> {
    let mut args: Vec<Arg> =
        reference::params(method).params.into_iter().filter(|a| !a.name.contains("[]")).map(|a| option(a.name, "VALUE").help(a.ty)).collect();
    args.push(option("json", "JSON").help("all parameters as one JSON object"));
    args
}

/// The whole command line.
pub fn command() -> Command {
    let mut cmd = Command::new("tidemark")
        .about("the JSON-RPC client of tidemarkd")
        .arg(option("socket", "PATH").short('s').value_hint(ValueHint::FilePath).help("JSON-RPC socket"))
        .arg(option("timeout", "SECONDS").short('t').help("how long to wait for the answer"))
        .subcommand(Command::new("top").about("live view of reactors, bdevs, exports, snapshots and jobs").arg(flag("once")).arg(option("interval", "SECS")))
        .subcommand(Command::new("completions").about("shell completions").arg(Arg::new("shell").value_parser(["bash", "zsh", "fish"]).required(true)))
        .subcommand(Command::new("rpc-reference").about("every method in Markdown (docs/rpc.md)"));
    let file = |name: &'static str| Arg::new(name).value_hint(ValueHint::FilePath).required(true);
    let mut start = Command::new("start").about("back up a sealed snapshot").arg(flag("detach"));
    if let Some(m) = reference::modules().iter().flat_map(|(_, ms)| ms.iter()).find(|m| m.name == "backup_start") {
        start = start.args(method_options(m));
    }
    cmd = cmd.subcommand(
        Command::new("backup")
            .about("start, watch, verify and restore backups")
            .subcommand(start)
            .subcommand(Command::new("status").about("jobs and their progress").arg(Arg::new("id")).arg(flag("wait")))
            .subcommand(Command::new("verify").about("check a backup chain's checksums").arg(file("manifest")))
            .subcommand(
                Command::new("restore")
                    .about("restore a backup chain")
                    .arg(file("manifest"))
                    .arg(option("to-file", "FILE").value_hint(ValueHint::FilePath))
                    .arg(option("to-bdev", "BDEV")),
            ),
    );
    for (_, methods) in reference::modules() {
        for m in methods {
            cmd = cmd.subcommand(Command::new(m.name).about(m.summary).args(method_options(m)));
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        // clap's own checks: no duplicate names, valid options.
        super::command().debug_assert();
    }
}
