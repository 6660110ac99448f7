//! The status's promotion estimate: how long a `promote` now would take,
//! from the log it would replay and what the last readiness checks measured.
//!
//! A promote is its own steps, the recovery and the `db_verify` of what
//! changed since the last verified check ([`EstimateParts`]). Each part
//! comes from a measurement: the recovery from the checks' replay rates (or,
//! for a log too short to time a rate, from the last check's own recovery
//! of that log), the verify from the check's `db_verify` time and the share
//! promote repeats, and promote's own steps from promote's phases.

use super::StandbyStatus;
use serde::{Deserialize, Serialize};

/// Catastrophic recovery's replay rate before any check measured one.
const DEFAULT_REPLAY_BYTES_PER_SEC: f64 = 100e6;
/// What a promote spends besides recovery and verify, its binaries in the
/// page cache: asking the primary (refused at once when its machine is
/// down; one that drops packets instead adds up to promote's 5 s connect
/// timeout, not counted), stopping the standby, reading the log's tail,
/// choosing what to verify again, and recording the promotion. Measured as
/// promote's wall time less its recovery and verify phases, failover of a
/// 4.1 GiB mirror with it cached (2026-12-07, load 2.6): 0.012 s. What the
/// same steps add with the page cache cold is [`COLD_START_SECONDS`].
const PROMOTE_OWN_SECONDS: f64 = 0.015;
/// What a cold page cache adds to a promote besides the reads the check
/// times ([`cold_reads`]): `tandem-standby` (118 MB with its debug
/// information), `db_recover` and libdb paged in from disk, the
/// directories' inodes read again. Measured as a cold promote's excess
/// over a warm one beyond those reads (2026-12-07, page cache dropped, 1.0
/// and 4.0 GiB mirrors, load 2–4): 0.025–0.04 s, of which 0.02–0.03 s
/// before promote's own clock starts.
const COLD_START_SECONDS: f64 = 0.03;
/// The least a catastrophic recovery takes, however little log it replays:
/// `db_recover`'s start, its cache region, its checkpoint and fsyncs.
/// Measured 0.01 s (warm, a check's clone) to 0.024 s (promote, page cache
/// dropped) for 0.4 MiB of log.
const RECOVERY_LEAST_SECONDS: f64 = 0.015;

/// Durable writes in promote's verify phase: the saved `DB_CONFIG` and the
/// recovery's, before it; the original put back (or removed, and the
/// directory fsynced), after. With 10–20 ms each under other writers' load
/// (measured 2026-12-07, load 8–17: verify phases of 0.03–0.08 s that
/// verified nothing), they are most of that phase.
const DB_CONFIG_WRITES: f64 = 3.0;

/// Wall seconds per CPU second of an urgent recovery (its own session at
/// niceness -10), against the check's CPU seconds for the same log:
/// 1.07–1.13 in the benchmark's promote section (105 and 504 MiB of log,
/// 2 cores at load 6–9; the rest is reading and fsync). At the normal
/// priority the same recovery took 1.1–3.7× its CPU time there.
const URGENT_WALL_PER_CPU: f64 = 1.10;

/// What the promotion estimate is made of, seconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct EstimateParts {
    /// Promote's own steps ([`PROMOTE_OWN_SECONDS`]).
    pub own: f64,
    /// Catastrophic recovery of the log a promotion would replay now.
    pub recovery: f64,
    /// `db_verify` of the databases promote would verify again, and its
    /// proof that the others hold what the last check verified.
    pub verify: f64,
    /// Reading from disk what recovery reads, when the page cache holds
    /// none of the mirror (a failover after the standby's machine
    /// restarted, or after its cache went to other work): the checks'
    /// recoveries run on a clone just written, all in the cache, so their
    /// times leave it out. Counted in the estimate, so that it bounds a
    /// cold promote; a promote with the mirror in the cache takes up to
    /// this much less.
    #[serde(default)]
    pub cold_reads: f64,
}

/// Whether promote's recovery will run ahead of other work
/// ([`tandem_shared::bdb::BdbTools::urgent`]): asked once per process.
pub(super) fn promote_is_urgent() -> bool {
    static URGENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *URGENT.get_or_init(tandem_shared::bdb::urgent_allowed)
}

/// The replay rate a promotion now would see, from the last few checks:
/// with an `urgent` promote, their median rate per CPU second (the work,
/// whatever else ran beside the checks) slowed by what an urgent recovery
/// still waits; otherwise their median wall rate (one check's wall time
/// carries the CPU contention of its moment, BDB-NOTES.md §5). The history
/// holds on through checks of too little log to time (the last one
/// counts only when it could be timed); a check an older version wrote,
/// without history, counts alone. `None` when no check could be timed.
fn replay_rate(check: &crate::readiness::CheckReport, urgent: bool) -> Option<f64> {
    let wall = median(&check.replay_rates).or_else(|| check.replay_rate())?;
    if !urgent {
        return Some(wall);
    }
    Some(
        median(&check.replay_cpu_rates)
            .or(check.replay_cpu_rate())
            .map_or(wall, |cpu| cpu / URGENT_WALL_PER_CPU),
    )
}

/// The median of the positive rates, if any.
fn median(rates: &[f64]) -> Option<f64> {
    let mut rates: Vec<f64> = rates
        .iter()
        .copied()
        .filter(|r| r.is_finite() && *r > 0.0)
        .collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    let mid = rates.len() / 2;
    Some(if rates.len() % 2 == 1 {
        rates[mid]
    } else {
        (rates[mid - 1] + rates[mid]) / 2.0
    })
}

impl StandbyStatus {
    /// The share of the last check's `db_verify` work a promote now would
    /// repeat: with a verified record, only the databases the log changes
    /// after it (by size): those open transactions wrote when no log came
    /// since, else those the log wrote since its last checkpoint. Without
    /// one, all of it.
    fn verify_share(&self) -> f64 {
        let Some(c) = self.last_check.as_ref().filter(|c| c.ok) else {
            return 1.0;
        };
        match c.verified_to {
            Some(at) if at == self.durable_lsn => c.verify_share_idle.unwrap_or(1.0),
            Some(_) => c.verify_share_writing.unwrap_or(1.0),
            None => 1.0,
        }
    }

    /// The promotion estimates, from the replay bytes and the last checks;
    /// `urgent`: promote's recovery will run ahead of other work.
    pub(super) fn estimate_promotion(&mut self, urgent: bool) {
        let check = self.last_check.as_ref().filter(|c| c.ok);
        let replay = self.replay_log_bytes as f64;
        let recovery = match check {
            Some(c) => match replay_rate(c, urgent) {
                Some(rate) => replay / rate,
                // The checks' recoveries were too short to time a rate:
                // the last one's own time for its log, the rest at the
                // default rate.
                None => {
                    let own = match c.recovery_cpu_seconds {
                        Some(cpu) if urgent => cpu * URGENT_WALL_PER_CPU,
                        _ => c.recovery_seconds,
                    };
                    own + (replay - c.log_bytes as f64).max(0.0) / DEFAULT_REPLAY_BYTES_PER_SEC
                }
            },
            None => replay / DEFAULT_REPLAY_BYTES_PER_SEC,
        }
        .max(RECOVERY_LEAST_SECONDS);
        self.replay_estimate_seconds = recovery;
        let verify = match check {
            // Urgent, the databases verify in parallel at full speed: at
            // most their CPU seconds together, where the check's wall time
            // also counts its waits for a CPU.
            Some(c) if urgent => c
                .verify_cpu_seconds
                .map_or(c.verify_seconds, |cpu| cpu.min(c.verify_seconds)),
            Some(c) => c.verify_seconds,
            None => 0.0,
        } * self.verify_share()
            + self.selection_seconds();
        let parts = EstimateParts {
            own: PROMOTE_OWN_SECONDS,
            recovery,
            verify,
            cold_reads: COLD_START_SECONDS + check.map_or(0.0, |c| cold_reads(c, replay)),
        };
        self.promotion_estimate_seconds =
            parts.recovery + parts.verify + parts.own + parts.cold_reads;
        self.promotion_estimate_parts = Some(parts);
    }

    /// What promote's verify phase spends besides `db_verify`, as the last
    /// check measured it: the proof that the databases it skips are
    /// unchanged (rehearsed on the check's clone; only with a verified
    /// record: without one promote verifies everything and proves
    /// nothing), and the durable writes of the recovery's `DB_CONFIG`
    /// ([`DB_CONFIG_WRITES`], at the check's own durable write time).
    fn selection_seconds(&self) -> f64 {
        let Some(c) = self.last_check.as_ref().filter(|c| c.ok) else {
            return 0.0;
        };
        let proof = c
            .selection_seconds
            .filter(|_| c.verified_to.is_some())
            .unwrap_or(0.0);
        proof + DB_CONFIG_WRITES * c.durable_write_seconds.unwrap_or(0.0)
    }
}

/// What a cold promote's recovery spends reading, from what the check read
/// bypassing the cache: the log at the rate the check read it (the log
/// since the check too: recovery reads every log file), and the pages the
/// log names, in proportion to the log (the log since the check names
/// pages of its own; in proportion is the bound for a log that writes new
/// pages). Recovery reads synchronously: catastrophic recovery's first pass
/// over the log does little else, and BDB reads a page when a record needs
/// it, so the reads add to the replay rather than overlap it. Measured
/// (2026-12-07, a 4.1 GiB mirror after a check, 0.8 MiB of log naming 209
/// pages): promote's recovery took 0.034 s with the mirror evicted from
/// the cache, 0.013 s with it cached.
fn cold_reads(c: &crate::readiness::CheckReport, replay: f64) -> f64 {
    let log_bytes = c.log_bytes as f64;
    let since = (replay - log_bytes).max(0.0);
    let log = match c.cold_log_seconds {
        Some(secs) if c.cold_log_bytes > 0 => {
            secs * (c.cold_log_bytes as f64 + since) / c.cold_log_bytes as f64
        }
        _ => 0.0,
    };
    let pages = match c.cold_page_seconds {
        Some(secs) if log_bytes > 0.0 => secs * (log_bytes + since) / log_bytes,
        Some(secs) => secs,
        None => 0.0,
    };
    log + pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StandbyState;
    use tandem_shared::LogPosition;

    /// A standby with a complete base whose log starts at the first file,
    /// holding 400 MB of it, and `check` as its last readiness check.
    fn estimated(check: Option<crate::readiness::CheckReport>) -> StandbyStatus {
        let state = StandbyState {
            base: Some(crate::state::BaseState {
                base_id: "b".into(),
                log_start: LogPosition::new(1, 0),
                files_done: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = StandbyStatus {
            lg_max: 100_000_000,
            durable_lsn: LogPosition::new(5, 0),
            last_check: check,
            ..Default::default()
        };
        s.fill_from_state(&state);
        assert_eq!(s.replay_log_bytes, 400_000_000);
        s.estimate_promotion(false);
        s
    }

    #[test]
    fn the_estimate_takes_the_median_rate_of_the_last_checks() {
        let check = |recovery_seconds: f64, rates: &[f64]| crate::readiness::CheckReport {
            ok: true,
            recovery_seconds,
            verify_seconds: 0.5,
            log_bytes: 200_000_000,
            replay_rates: rates.to_vec(),
            ..Default::default()
        };
        // The last check waited for the CPU (50 MB/s); the two before it
        // replayed at 200 MB/s: the estimate follows them, not it.
        let s = estimated(Some(check(4.0, &[200e6, 200e6, 50e6])));
        assert_eq!(s.replay_estimate_seconds, 2.0);
        assert_eq!(
            s.promotion_estimate_seconds,
            2.0 + 0.5 + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
        );
        // An even count: the middle two.
        let s = estimated(Some(check(1.0, &[100e6, 300e6, 50e6, 200e6])));
        assert_eq!(s.replay_estimate_seconds, 400e6 / 150e6);
        // A report an older version wrote: its own rate alone.
        let s = estimated(Some(check(1.0, &[])));
        assert_eq!(s.replay_estimate_seconds, 2.0);
        // The last check replayed too little log to time (its 0.5 s are
        // fixed costs): the rates of the checks before it.
        let short = |rates: &[f64]| crate::readiness::CheckReport {
            log_bytes: 1 << 20,
            ..check(0.5, rates)
        };
        let s = estimated(Some(short(&[200e6])));
        assert_eq!(s.replay_estimate_seconds, 2.0);
        // None could be timed: its own time for its log, the rest at the
        // default rate.
        let s = estimated(Some(short(&[])));
        let rest = (400e6 - f64::from(1 << 20)) / DEFAULT_REPLAY_BYTES_PER_SEC;
        assert_eq!(s.replay_estimate_seconds, 0.5 + rest);
    }

    #[test]
    fn an_urgent_promote_is_estimated_from_the_checks_cpu_time() {
        let check = crate::readiness::CheckReport {
            ok: true,
            // The checks waited for the CPU: 4 s of wall time for 1 s of
            // recovery work.
            recovery_seconds: 4.0,
            recovery_cpu_seconds: Some(1.0),
            verify_seconds: 0.5,
            log_bytes: 200_000_000,
            replay_rates: vec![50e6, 60e6, 50e6],
            replay_cpu_rates: vec![200e6, 100e6, 200e6],
            ..Default::default()
        };
        let mut s = estimated(Some(check.clone()));
        assert_eq!(s.replay_estimate_seconds, 400e6 / 50e6);
        s.estimate_promotion(true);
        assert_eq!(
            s.replay_estimate_seconds,
            400e6 / 200e6 * URGENT_WALL_PER_CPU
        );
        // Without a verify CPU time: the check's verify wall time.
        assert_eq!(
            s.promotion_estimate_seconds,
            s.replay_estimate_seconds + 0.5 + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
        );
        let mut s = estimated(Some(crate::readiness::CheckReport {
            verify_cpu_seconds: Some(0.2),
            ..check.clone()
        }));
        s.estimate_promotion(true);
        assert_eq!(
            s.promotion_estimate_seconds,
            s.replay_estimate_seconds + 0.2 + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
        );
        // A check that could not measure CPU time: the wall rates.
        let mut s = estimated(Some(crate::readiness::CheckReport {
            recovery_cpu_seconds: None,
            replay_cpu_rates: vec![],
            ..check
        }));
        s.estimate_promotion(true);
        assert_eq!(s.replay_estimate_seconds, 400e6 / 50e6);
    }

    #[test]
    fn a_verified_check_counts_only_the_databases_promote_verifies_again() {
        let check = crate::readiness::CheckReport {
            ok: true,
            recovery_seconds: 2.0,
            verify_seconds: 10.0,
            log_bytes: 200_000_000,
            verified_to: Some(LogPosition::new(5, 0)),
            verify_share_idle: Some(0.0),
            verify_share_writing: Some(0.25),
            ..Default::default()
        };
        // No log since the check: nothing to verify again.
        let s = estimated(Some(check.clone()));
        assert_eq!(
            s.promotion_estimate_seconds,
            4.0 + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
        );
        // Log since: the databases the log has been writing.
        let s = estimated(Some(crate::readiness::CheckReport {
            verified_to: Some(LogPosition::new(4, 0)),
            ..check.clone()
        }));
        assert_eq!(
            s.promotion_estimate_seconds,
            4.0 + 2.5 + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
        );
        // No record: all of it, as before.
        let s = estimated(Some(crate::readiness::CheckReport {
            verified_to: None,
            ..check
        }));
        assert_eq!(
            s.promotion_estimate_seconds,
            4.0 + 10.0 + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
        );
    }

    #[test]
    fn a_recovery_too_short_to_time_a_rate_is_estimated_from_its_own_time() {
        // The large bench's mirror after a check: 0.4 MiB of log, recovered
        // in 0.012 s (0.010 s CPU), too short for a rate.
        let check = crate::readiness::CheckReport {
            ok: true,
            recovery_seconds: 0.012,
            recovery_cpu_seconds: Some(0.010),
            log_bytes: 400_000_000,
            verified_to: Some(LogPosition::new(5, 0)),
            verify_share_idle: Some(0.0),
            verify_seconds: 4.5,
            ..Default::default()
        };
        let mut s = estimated(Some(check.clone()));
        assert_eq!(s.replay_estimate_seconds, RECOVERY_LEAST_SECONDS);
        // Urgent: its CPU time, still not below the least.
        s.estimate_promotion(true);
        assert_eq!(s.replay_estimate_seconds, RECOVERY_LEAST_SECONDS);
        let parts = s.promotion_estimate_parts.unwrap();
        assert_eq!(parts.own, PROMOTE_OWN_SECONDS);
        assert_eq!(parts.verify, 0.0);
        assert_eq!(
            s.promotion_estimate_seconds,
            PROMOTE_OWN_SECONDS + RECOVERY_LEAST_SECONDS + COLD_START_SECONDS
        );
        // A longer one (still untimed as a rate): its own time, and the log
        // since at the default rate; the wall time when not urgent.
        let check = crate::readiness::CheckReport {
            recovery_seconds: 0.045,
            recovery_cpu_seconds: Some(0.040),
            log_bytes: 300_000_000,
            ..check
        };
        let mut s = estimated(Some(check));
        assert_eq!(s.replay_estimate_seconds, 0.045 + 1.0);
        s.estimate_promotion(true);
        assert_eq!(s.replay_estimate_seconds, 0.040 * URGENT_WALL_PER_CPU + 1.0);
        let parts = s.promotion_estimate_parts.unwrap();
        assert_eq!(
            s.promotion_estimate_seconds,
            parts.recovery + parts.verify + parts.own + parts.cold_reads
        );
    }

    #[test]
    fn a_cold_promote_adds_the_reads_the_check_timed_bypassing_the_cache() {
        let check = crate::readiness::CheckReport {
            ok: true,
            recovery_seconds: 0.012,
            log_bytes: 200_000_000,
            cold_log_bytes: 200_000_000,
            cold_log_seconds: Some(0.2),
            cold_pages: 209,
            cold_page_seconds: Some(0.05),
            ..Default::default()
        };
        // 400 MB of log now, 200 MB at the check: the log since is read at
        // the check's rate, its pages in proportion.
        let s = estimated(Some(check.clone()));
        let parts = s.promotion_estimate_parts.unwrap();
        let cold = parts.cold_reads - COLD_START_SECONDS;
        assert!((cold - (0.4 + 0.1)).abs() < 1e-12, "{parts:?}");
        assert_eq!(
            s.promotion_estimate_seconds,
            parts.recovery + parts.verify + parts.own + parts.cold_reads
        );
        // No log since the check: what it read, as it read it.
        let s = estimated(Some(crate::readiness::CheckReport {
            log_bytes: 400_000_000,
            cold_log_bytes: 400_000_000,
            ..check.clone()
        }));
        let parts = s.promotion_estimate_parts.unwrap();
        assert!((parts.cold_reads - COLD_START_SECONDS - 0.25).abs() < 1e-12);
        // A file system that refused uncached reads: no reads known, the
        // start only.
        let s = estimated(Some(crate::readiness::CheckReport {
            cold_log_seconds: None,
            cold_page_seconds: None,
            ..check
        }));
        assert_eq!(
            s.promotion_estimate_parts.unwrap().cold_reads,
            COLD_START_SECONDS
        );
    }

    #[test]
    fn the_verify_part_counts_the_unchanged_file_proof_and_the_config_writes() {
        let check = crate::readiness::CheckReport {
            ok: true,
            recovery_seconds: 0.012,
            log_bytes: 400_000_000,
            verify_seconds: 4.5,
            verified_to: Some(LogPosition::new(5, 0)),
            verify_share_idle: Some(0.0),
            selection_seconds: Some(0.004),
            durable_write_seconds: Some(0.002),
            ..Default::default()
        };
        let s = estimated(Some(check.clone()));
        let verify = s.promotion_estimate_parts.unwrap().verify;
        assert!((verify - (0.004 + DB_CONFIG_WRITES * 0.002)).abs() < 1e-12);
        // Without a verified record promote verifies everything and
        // proves nothing unchanged: the writes only, besides db_verify.
        let s = estimated(Some(crate::readiness::CheckReport {
            verified_to: None,
            ..check
        }));
        let verify = s.promotion_estimate_parts.unwrap().verify;
        assert!((verify - (4.5 + DB_CONFIG_WRITES * 0.002)).abs() < 1e-12);
    }

    #[test]
    fn a_failed_last_check_falls_back_to_the_default_rate() {
        let failed = crate::readiness::CheckReport {
            ok: false,
            recovery_seconds: 1.0,
            log_bytes: 200_000_000,
            replay_rates: vec![400e6],
            ..Default::default()
        };
        for (check, urgent) in [(None, false), (None, true), (Some(failed), true)] {
            let mut s = estimated(check);
            s.estimate_promotion(urgent);
            assert_eq!(
                s.replay_estimate_seconds,
                400e6 / DEFAULT_REPLAY_BYTES_PER_SEC
            );
            assert_eq!(
                s.promotion_estimate_seconds,
                s.replay_estimate_seconds + PROMOTE_OWN_SECONDS + COLD_START_SECONDS
            );
        }
    }
}
