//! The reference model: what each block of the live volume and of each snapshot may read,
//! from the real-time order of submissions and completions alone (it knows nothing of epochs,
//! locks or tables).
//!
//! Blocks carry a tag: the id of the write that wrote them (0: zeros). For one block:
//! * a write `w` is *superseded* by `d` when `d` was submitted after `w` completed;
//! * a read over `[s_r, c_r]` may return any write submitted before `c_r` that no write
//!   completed before `s_r` supersedes, or the baseline if no write completed before `s_r`;
//! * a snapshot preserved at `T` is the same with only the writes submitted before `T`;
//!   sealed, it reads the writes that nothing (of those) supersedes, and never changes;
//! * after a crash, a block may hold any write that no *durable* write supersedes (durable:
//!   completed before the submission of a flush that completed), or the baseline if none is
//!   durable.

use std::collections::BTreeMap;

pub const IN_FLIGHT: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub s: u64,
    pub c: u64,
    pub tag: u64,
}

#[derive(Debug, Clone)]
pub struct SnapModel {
    /// Model time of the preserve.
    pub t: u64,
    /// Values observed in a full read while sealed: it must never change.
    pub pinned: Vec<Option<u64>>,
    /// Model time of the first pinning (reads that started earlier may see older content).
    pub pinned_at: u64,
    /// The target said sealed (before any crash since).
    pub sealed_seen: bool,
    /// The preserve call returned success: from then on the snapshot survives a crash.
    pub acked: bool,
    /// A delete is under way: reads may fail, it may vanish.
    pub deleting: bool,
    /// Came back from a crash while draining: its content is the crash image (pinned).
    pub taken_before_crash: bool,
    /// What was durable at the preserve: a snapshot that was still draining at a crash may
    /// come back as any crash image *of the moment of its preserve*.
    pub flushed_at_t: u64,
}

pub struct Model {
    pub clock: u64,
    pub baseline: Vec<u64>,
    writes: Vec<WriteRec>,
    by_block: Vec<Vec<u32>>,
    /// Highest submission time of a completed flush.
    flushed_upto: u64,
    pub snaps: BTreeMap<String, SnapModel>,
    pub next_tag: u64,
}

impl Model {
    pub fn new(blocks: u64) -> Model {
        Model {
            clock: 1,
            baseline: vec![0; blocks as usize],
            writes: Vec::new(),
            by_block: vec![Vec::new(); blocks as usize],
            flushed_upto: 0,
            snaps: BTreeMap::new(),
            next_tag: 1,
        }
    }

    /// A fresh write tag (never 0, which stands for zeros).
    pub fn next_tag_take(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Records a write submitted now; returns its index.
    pub fn begin_write(&mut self, off: u64, n: u64, tag: u64) -> usize {
        let s = self.tick();
        let id = self.writes.len();
        self.writes.push(WriteRec { s, c: IN_FLIGHT, tag });
        for b in off..off + n {
            self.by_block[b as usize].push(id as u32);
        }
        id
    }

    pub fn end_write(&mut self, id: usize) {
        let c = self.tick();
        self.writes[id].c = c;
    }

    pub fn flush_done(&mut self, s: u64) {
        self.flushed_upto = self.flushed_upto.max(s);
    }

    fn acceptable(&self, b: u64, s_r: u64, c_r: u64, before: u64) -> Vec<u64> {
        let ws: Vec<&WriteRec> = self.by_block[b as usize].iter().map(|&i| &self.writes[i as usize]).filter(|w| w.s < c_r && w.s < before).collect();
        let done: Vec<&&WriteRec> = ws.iter().filter(|w| w.c < s_r).collect();
        let mut out: Vec<u64> = ws.iter().filter(|w| !done.iter().any(|d| w.c < d.s)).map(|w| w.tag).collect();
        if done.is_empty() {
            out.push(self.baseline[b as usize]);
        }
        out
    }

    /// Values a read of the live volume over `[s_r, c_r]` may return at block `b`.
    pub fn live_read(&self, b: u64, s_r: u64, c_r: u64) -> Vec<u64> {
        self.acceptable(b, s_r, c_r, u64::MAX)
    }

    /// Values a read of snapshot `t` over `[s_r, c_r]` may return at block `b`.
    pub fn snap_read(&self, b: u64, t: u64, s_r: u64, c_r: u64) -> Vec<u64> {
        self.acceptable(b, s_r, c_r, t)
    }

    /// Submission time of the latest completed flush (writes completed before it are durable).
    pub fn flushed_upto(&self) -> u64 {
        self.flushed_upto
    }

    /// Values block `b` may hold after a crash, counting only writes submitted before
    /// `before` and flushes completed when `flushed_upto` was the latest.
    pub fn after_crash(&self, b: u64, before: u64, flushed_upto: u64) -> Vec<u64> {
        let ws: Vec<&WriteRec> = self.by_block[b as usize].iter().map(|&i| &self.writes[i as usize]).filter(|w| w.s < before).collect();
        let durable: Vec<&&WriteRec> = ws.iter().filter(|w| w.c != IN_FLIGHT && w.c < flushed_upto).collect();
        let mut out: Vec<u64> = ws.iter().filter(|w| !durable.iter().any(|d| w.c < d.s)).map(|w| w.tag).collect();
        if durable.is_empty() {
            out.push(self.baseline[b as usize]);
        }
        out
    }

    /// Starts a new life after a restart: the observed live image is the new baseline.
    pub fn restart(&mut self, live: Vec<u64>) {
        self.baseline = live;
        self.writes.clear();
        for v in &mut self.by_block {
            v.clear();
        }
        self.flushed_upto = 0;
        for s in self.snaps.values_mut() {
            s.t = 0;
            s.taken_before_crash = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_semantics() {
        let mut m = Model::new(1);
        let a = m.begin_write(0, 1, 10);
        m.end_write(a);
        let s_r = m.tick();
        let b = m.begin_write(0, 1, 11);
        let c_r = m.tick();
        // A read overlapping write b may see a or b, not the baseline.
        assert_eq!(m.live_read(0, s_r, c_r), vec![10, 11]);
        m.end_write(b);
        let t = m.tick();
        let _c = m.begin_write(0, 1, 12);
        let s2 = m.tick();
        assert_eq!(m.snap_read(0, t, s2, s2 + 1), vec![11]);
        // Nothing flushed: a crash may leave any of them, or the baseline.
        assert_eq!(m.after_crash(0, u64::MAX, m.flushed_upto()), vec![10, 11, 12, 0]);
        m.flush_done(s2);
        assert_eq!(m.after_crash(0, u64::MAX, m.flushed_upto()), vec![11, 12]);
    }
}
