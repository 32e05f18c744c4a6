//! The target's NVMe/TCP receive path over an arbitrary byte stream from a host: common
//! header validation, digests, ICReq, capsules (with their SGL and data plan) and H2CData
//! headers, exactly as a connection parses them. Run: `cargo fuzz run nvmf_pdu`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::nvmf::pdu::fuzz_target_stream(data);
});
