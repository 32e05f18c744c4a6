//! The SCSI command set: an arbitrary CDB (first 16 bytes) and Data-Out (the rest), parsed
//! against a small RAM logical unit and, when it parses, executed on a simulated core. Every
//! command must end with data or sense, never a panic, and never touch blocks outside the
//! device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::scsi_cdb(data);
});
