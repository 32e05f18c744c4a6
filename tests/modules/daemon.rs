//! `tidemarkd-test-modules`: tidemarkd with the test-only modules of this folder linked in.
//! Naming a module here (`mod throwaway;`) is all it takes: the module registers itself.

mod throwaway;

fn main() {
    tidemark::daemon::main()
}
