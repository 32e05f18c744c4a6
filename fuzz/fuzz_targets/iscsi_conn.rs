//! An initiator's byte stream on one iSCSI connection, through the real connection of an
//! in-process target (`iscsi::conn`, on a reactor, over loopback TCP): login, full feature
//! phase, SCSI commands on a RAM LUN. The target must answer and close, never hang or panic.
//! Run: `cargo fuzz run iscsi_conn fuzz/corpus/iscsi_conn`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::iscsi_conn(data);
});
