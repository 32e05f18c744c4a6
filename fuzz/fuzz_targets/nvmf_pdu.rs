//! A host's byte stream on one NVMe/TCP connection, through the real connection of an
//! in-process target (`nvmf::connection::serve` and its read loop, on a reactor, over loopback
//! TCP): ICReq, capsules with their SGLs and data, H2CData, digests, admin and I/O commands on
//! a RAM namespace. The target must answer and close, never hang or panic.
//! Run: `cargo fuzz run nvmf_pdu fuzz/corpus/nvmf_pdu`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::nvmf_pdu(data);
});
