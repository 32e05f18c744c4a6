//! The workload flags bdevperf and nvme_perf share (SPDK's bdevperf and spdk_nvme_perf take
//! the same ones), and what a workload name means.

use clap::Args;

#[derive(Args)]
pub struct Workload {
    /// Queue depth per core.
    #[arg(short = 'q', long, default_value_t = 32)]
    pub queue_depth: usize,
    /// I/O size in bytes.
    #[arg(short = 'o', long, default_value_t = 4096)]
    pub io_size: usize,
    /// randread, randwrite, randrw, read, write (bdevperf also: verify, which writes a pattern,
    /// reads it back and compares).
    #[arg(short = 'w', long, default_value = "randread")]
    pub workload: String,
    /// Percentage of reads in randrw.
    #[arg(short = 'M', long, default_value_t = 50)]
    pub rwmixread: u32,
    /// Seconds to run.
    #[arg(short = 't', long, default_value_t = 10)]
    pub time: u64,
}

impl Workload {
    /// (random offsets, percentage of reads) of a read/write workload; None for another name.
    pub fn mix(&self) -> Option<(bool, u32)> {
        match self.workload.as_str() {
            "randread" => Some((true, 100)),
            "randwrite" => Some((true, 0)),
            "randrw" | "rw" => Some((true, self.rwmixread.min(100))),
            "read" => Some((false, 100)),
            "write" => Some((false, 0)),
            _ => None,
        }
    }
}
