//! The mirrors' metrics: per-leg operations, errors and state, degraded state, dirty regions,
//! rebuild progress and rate. A subsystem of its own (`raid`) so that the target's metrics
//! endpoint picks them up.

use super::layout::MAX_SLOTS;
use super::MirrorBdev;
use crate::config::ConfigCall;
use crate::metrics::{labels, Labels, MetricsOut};
use crate::module::{Ctx, Module};
use std::sync::atomic::Ordering::Relaxed;

pub struct MirrorSubsystem;

impl Module for MirrorSubsystem {
    fn name(&self) -> &'static str {
        "raid"
    }

    fn config(&self, _t: &Ctx) -> Vec<ConfigCall> {
        // Mirrors are bdevs: the bdev subsystem saves them.
        Vec::new()
    }

    fn metrics(&self, t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let all = t.bdevs.list();
        let mirrors: Vec<&MirrorBdev> = all.iter().filter_map(|e| e.bdev().as_any().downcast_ref::<MirrorBdev>()).collect();
        if mirrors.is_empty() {
            return Ok(());
        }
        let mut degraded = Vec::new();
        let mut dirty = Vec::new();
        let mut unsynced = Vec::new();
        let mut generation = Vec::new();
        let mut progress = Vec::new();
        let mut rate = Vec::new();
        let mut rebuild_bytes = Vec::new();
        let mut rebuilt = Vec::new();
        let mut repairs = Vec::new();
        let mut failures = Vec::new();
        let mut wi_persists = Vec::new();
        let mut cleared = Vec::new();
        let mut splits = Vec::new();
        let mut leg_state = Vec::new();
        let mut leg_ops = Vec::new();
        let mut leg_errors = Vec::new();
        let mut leg_qd = Vec::new();
        let mut leg_stale = Vec::new();
        let mut leg_rejoins = Vec::new();
        let mut fenced = Vec::new();
        for m in mirrors {
            let sh = m.shared();
            let st = m.status();
            let name = sh.props.name();
            let l = labels(&[("mirror", name)]);
            degraded.push((l.clone(), if st.degraded() { 1.0 } else { 0.0 }));
            // Every mirror (0 without a reservation_key): an alert on it needs the series.
            fenced.push((l.clone(), if sh.fenced.load(Relaxed) { 1.0 } else { 0.0 }));
            dirty.push((l.clone(), st.dirty_regions as f64));
            unsynced.push((l.clone(), st.unsynced_regions as f64));
            generation.push((l.clone(), st.generation as f64));
            let (p, r) = match &st.process {
                Some(p) if p.total_regions > 0 => (p.done_regions as f64 / p.total_regions as f64, p.rate_bytes_per_sec),
                Some(p) => (1.0, p.rate_bytes_per_sec),
                None => (1.0, 0.0),
            };
            progress.push((l.clone(), p));
            rate.push((l.clone(), r));
            let c = &sh.counters;
            rebuild_bytes.push((l.clone(), c.rebuild_bytes.load(Relaxed)));
            rebuilt.push((l.clone(), c.rebuilt_regions.load(Relaxed)));
            repairs.push((l.clone(), c.read_repairs.load(Relaxed)));
            failures.push((l.clone(), c.leg_failures.load(Relaxed)));
            wi_persists.push((l.clone(), c.write_intent_persists.load(Relaxed)));
            cleared.push((l.clone(), c.regions_cleared.load(Relaxed)));
            splits.push((l, c.splits.load(Relaxed)));
            for s in &st.slots {
                let ll: Labels = labels(&[("mirror", name), ("slot", &s.slot.to_string()), ("leg", &s.name)]);
                let mut with_state = ll.clone();
                with_state.push(("state", s.state.to_string()));
                leg_state.push((with_state, 1.0));
                leg_stale.push((ll.clone(), s.stale_regions as f64));
                for (how, n) in [("auto", s.rejoins_auto), ("rpc", s.rejoins_rpc)] {
                    let mut v = ll.clone();
                    v.push(("how", how.to_string()));
                    leg_rejoins.push((v, n));
                }
                if s.slot >= MAX_SLOTS {
                    continue;
                }
                let (mut reads, mut writes, mut rerr, mut werr, mut qd) = (0, 0, 0, 0, 0);
                for core in sh.leg_stats.iter() {
                    let k = &core[s.slot];
                    reads += k.reads.load(Relaxed);
                    writes += k.writes.load(Relaxed);
                    rerr += k.read_errors.load(Relaxed);
                    werr += k.write_errors.load(Relaxed);
                    qd += k.in_flight.load(Relaxed);
                }
                let typed = |t: &str| {
                    let mut v = ll.clone();
                    v.push(("type", t.to_string()));
                    v
                };
                leg_ops.push((typed("read"), reads));
                leg_ops.push((typed("write"), writes));
                leg_errors.push((typed("read"), rerr));
                leg_errors.push((typed("write"), werr));
                leg_qd.push((ll, qd as f64));
            }
        }
        out.gauge(
            "tidemark_mirror_degraded",
            "1 when a mirror runs with fewer in-sync legs than it should (a leg failed, is missing or is being rebuilt, or one is left).",
            &degraded,
        )?;
        out.gauge(
            "tidemark_mirror_fenced",
            "1 when a mirror with a reservation_key was fenced: a leg refused its write because another head took the mirror over; it acknowledges no host write any more.",
            &fenced,
        )?;
        out.gauge("tidemark_mirror_dirty_regions", "Regions whose write-intent bit is set (written recently; resynchronised after a crash).", &dirty)?;
        out.gauge("tidemark_mirror_unsynced_regions", "Regions still to resynchronise after a crash.", &unsynced)?;
        out.gauge("tidemark_mirror_generation", "Generation of the mirror's superblock.", &generation)?;
        out.gauge("tidemark_mirror_rebuild_progress_ratio", "Share of the current rebuild or resync done (1 when none runs).", &progress)?;
        out.gauge("tidemark_mirror_rebuild_rate_bytes_per_second", "Copy rate of the current rebuild or resync.", &rate)?;
        out.counter("tidemark_mirror_rebuild_bytes", "Bytes copied by rebuilds and resyncs.", &rebuild_bytes)?;
        out.counter("tidemark_mirror_rebuild_regions", "Regions copied by rebuilds and resyncs.", &rebuilt)?;
        out.counter("tidemark_mirror_read_repairs", "Blocks ranges rewritten on a leg after it failed to read them.", &repairs)?;
        out.counter("tidemark_mirror_leg_failures", "Legs dropped after an I/O error.", &failures)?;
        out.counter(
            "tidemark_mirror_write_intent_persists",
            "Batches of write-intent bitmap pages written before first writes to clean regions.",
            &wi_persists,
        )?;
        out.counter("tidemark_mirror_regions_cleared", "Write-intent bits cleared after their regions went quiet.", &cleared)?;
        out.counter("tidemark_mirror_splits", "Legs split off as point-in-time images.", &splits)?;
        out.gauge("tidemark_mirror_leg_state", "State of each leg of a mirror (value 1; the state is a label).", &leg_state)?;
        out.gauge("tidemark_mirror_leg_stale_regions", "Regions a leg misses (departed) or still has to receive (rebuilding).", &leg_stale)?;
        out.counter(
            "tidemark_mirror_leg_rejoins",
            "Returns of a departed leg to its slot (incremental re-joins), by itself (how=auto) or by bdev_raid_add_base_bdev (how=rpc).",
            &leg_rejoins,
        )?;
        out.counter("tidemark_mirror_leg_ops", "I/O operations each leg completed for its mirror.", &leg_ops)?;
        out.counter("tidemark_mirror_leg_errors", "I/O operations each leg failed for its mirror.", &leg_errors)?;
        out.gauge("tidemark_mirror_leg_queue_depth", "I/O operations in flight on each leg for its mirror.", &leg_qd)?;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
