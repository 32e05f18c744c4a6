//! tidemarkd: the target daemon (its body is [`tidemark::daemon::main`]).

fn main() {
    tidemark::daemon::main()
}
