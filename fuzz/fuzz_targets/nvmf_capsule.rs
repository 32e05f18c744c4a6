//! One command capsule's SQE and in-capsule data through the parts of the target that judge
//! a command before it runs: header checks for every digest setting, the data plan from the
//! SGL, and the Fabrics Connect data fields. Run: `cargo fuzz run nvmf_capsule`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::nvmf_capsule(data);
});
