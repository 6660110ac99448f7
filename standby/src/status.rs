//! What `tandem-standby status` reports. A running standby rewrites
//! `.tandem/status.json` several times a second; when no standby runs, the
//! status is computed from the directory itself (state file and log files),
//! so it works either way.

use crate::state::{StandbyDir, StandbyState};
use serde::{Deserialize, Serialize};
use tandem_shared::LogPosition;

pub mod estimate;
pub mod etcd;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StandbyStatus {
    /// "standby", or "promoted" once promoted.
    pub role: String,
    /// A `tandem-standby run` process holds the directory.
    pub running: bool,
    pub pid: Option<u32>,
    pub connected: bool,
    pub primary: Option<String>,
    pub env_id: Option<String>,
    pub epoch: u64,
    /// "no base", "copying base", "catching up", "streaming", "promoted".
    pub phase: String,
    pub base_id: Option<String>,
    /// The directory holds a complete base and the log it needs, and no
    /// readiness check of that base has failed since (the last check of the
    /// current base is not a failure). Never contradicts the check: a
    /// failure holds until a check passes again or the base is replaced.
    pub recoverable: bool,
    /// The primary's end of log as last heard (a heartbeat or a log chunk).
    pub primary_end_lsn: LogPosition,
    pub durable_lsn: LogPosition,
    /// Log bytes the primary has that the standby does not hold durably;
    /// `null` when unknown: not connected, or no word from the primary for
    /// longer than the silence deadline (the primary may have written any
    /// amount since). A cut network never reads as "caught up".
    pub lag_bytes: Option<u64>,
    /// Seconds since the standby last knew it held everything the primary
    /// had: 0 while connected and caught up; while nothing arrives it grows
    /// with the time since the last contact.
    pub lag_seconds: f64,
    pub last_contact_unix_ms: u64,
    /// The follow loop's silence deadline: no word from the primary for
    /// this long ends the session, and makes `lag_bytes` unknown.
    #[serde(default)]
    pub primary_silence_ms: u64,
    pub updated_unix_ms: u64,
    pub log_bytes_received: u64,
    pub file_bytes_received: u64,
    pub digest_failures: u64,
    pub rejected_messages: u64,
    pub reconnects: u64,
    /// When the standby last held everything the primary had.
    pub caught_up_unix_ms: u64,
    /// Log file size (BDB's lg_max), for lag arithmetic.
    pub lg_max: u32,
    pub last_error: Option<String>,
    pub promotion: Option<crate::state::Promotion>,
    /// The last readiness check (clone, recover, verify).
    pub last_check: Option<crate::readiness::CheckReport>,
    /// Log bytes a promotion would replay now (from the base's first log).
    pub replay_log_bytes: u64,
    /// Rebases completed by this process, and the last one.
    pub rebases: u64,
    pub last_rebase: Option<crate::mirror::RebaseReport>,
    /// Estimated recovery time of a promotion now, from the median replay
    /// rate of the last few checks (or 100 MB/s, BDB-NOTES.md §5, before the
    /// first check; when the checks' recoveries were too short to time a
    /// rate, the last one's own time for its log), and never below the
    /// least a recovery takes.
    pub replay_estimate_seconds: f64,
    /// Estimated time of a whole `promote` now: the replay above, the last
    /// check's `db_verify` time (of what promote would verify again) and
    /// its proof that the rest is unchanged, promote's own steps (stop,
    /// ask, record), and what reading from disk adds when the page cache
    /// holds none of the mirror (`cold_reads`: the estimate bounds a cold
    /// failover; with the mirror cached, promote takes up to that less).
    /// Within 20 %, or 0.1 s where that is more (bench/README.md).
    #[serde(default)]
    pub promotion_estimate_seconds: f64,
    /// What that estimate is made of.
    #[serde(default)]
    pub promotion_estimate_parts: Option<estimate::EstimateParts>,
    /// A base copy (or rebase) under way, and its progress: bytes received
    /// or reused of the files the primary listed.
    #[serde(default)]
    pub base_copy_active: bool,
    #[serde(default)]
    pub base_copy_done_bytes: u64,
    #[serde(default)]
    pub base_copy_total_bytes: u64,
    #[serde(default)]
    pub base_copy_started_unix_ms: u64,
    /// The continuous archive registered with this directory, if any, and
    /// the end of the log it holds.
    #[serde(default)]
    pub archive: Option<String>,
    #[serde(default)]
    pub archived_lsn: Option<LogPosition>,
    /// Log files the mirror no longer needs, kept until the archive has them.
    #[serde(default)]
    pub archive_held_log_bytes: u64,
    /// The last scrub (every page and log record against what was written).
    #[serde(default)]
    pub scrub: Option<crate::scrub::ScrubReport>,
    /// The last restore drill of the continuous archive (`--drill-every`).
    #[serde(default)]
    pub archive_drill: Option<crate::archive::drill::DrillReport>,
    /// `run --rejoin` is under way: the page-delta new base (its progress
    /// is the base copy's) has not replaced the mirror yet.
    #[serde(default)]
    pub rejoining: bool,
    /// What rejoins discarded, whose log is kept in `.tandem/discarded/`
    /// until the operator removes it; oldest first.
    #[serde(default)]
    pub discarded: Vec<crate::rejoin::DiscardReport>,
    /// The epoch history this directory knows (where each promotion began).
    #[serde(default)]
    pub history: Vec<tandem_shared::epochs::EpochStart>,
}

impl StandbyStatus {
    pub fn phase_of(
        state: &StandbyState,
        durable: LogPosition,
        primary_end: LogPosition,
    ) -> &'static str {
        match &state.base {
            _ if state.promoted.is_some() => "promoted",
            None => "no base",
            Some(b) if !b.files_done => "copying base",
            Some(_) if !state.is_recoverable(durable) || durable < primary_end => "catching up",
            Some(_) => "streaming",
        }
    }

    pub fn fill_from_state(&mut self, state: &StandbyState) {
        self.role = if state.promoted.is_some() {
            "promoted"
        } else {
            "standby"
        }
        .into();
        self.env_id = state.env_id.clone();
        self.epoch = state.epoch;
        self.history = state.history.clone();
        self.base_id = state.base.as_ref().map(|b| b.base_id.clone());
        let base_id = state.base.as_ref().map(|b| &b.base_id);
        let check_failed = self
            .last_check
            .as_ref()
            .is_some_and(|c| !c.ok && c.base_id.as_ref() == base_id);
        // Damage a scrub found stays until a later scrub passes.
        let scrub_failed = self.scrub.as_ref().is_some_and(|r| !r.ok);
        self.recoverable = state.is_recoverable(self.durable_lsn) && !check_failed && !scrub_failed;
        self.phase = Self::phase_of(state, self.durable_lsn, self.primary_end_lsn).into();
        self.promotion = state.promoted.clone();
        self.replay_log_bytes = state.base.as_ref().map_or(0, |b| {
            b.log_start.bytes_until(self.durable_lsn, self.lg_max)
        });
        self.estimate_promotion(estimate::promote_is_urgent());
    }

    /// The continuous archive's registration and the log held for it
    /// (read with [`crate::archive_hold::observe`]).
    pub fn set_archive(
        &mut self,
        (hold, held_bytes): (Option<crate::archive_hold::ArchiveHold>, u64),
    ) {
        self.archive = hold.as_ref().map(|h| h.archive.clone());
        self.archived_lsn = hold.map(|h| h.log_end);
        self.archive_held_log_bytes = held_bytes;
    }

    /// File bytes received or reused, counted only inside a base copy.
    pub fn note_base_copy_bytes(&mut self, n: u64) {
        if self.base_copy_active {
            self.base_copy_done_bytes += n;
        }
    }

    /// Called whenever the primary's end or the durable position moves:
    /// holding the primary's end as last heard means the standby was caught
    /// up as of that contact (not as of now: the primary may have written
    /// more since, and a cut network is only noticed later).
    pub fn note_progress(&mut self) {
        if self.connected
            && self
                .durable_lsn
                .bytes_until(self.primary_end_lsn, self.lg_max)
                == 0
        {
            self.caught_up_unix_ms = self.caught_up_unix_ms.max(self.last_contact_unix_ms);
        }
    }

    /// Lag as of `now_ms`. The primary's end is only known as of the last
    /// contact: past `silence_ms` without one, bytes are unknown and the
    /// seconds count from the last moment the standby knew it was caught up
    /// (or, if never, from the last contact).
    pub fn compute_lag(&mut self, now_ms: u64, silence_ms: u64) {
        let fresh = self.connected
            && self.last_contact_unix_ms != 0
            && now_ms.saturating_sub(self.last_contact_unix_ms) <= silence_ms;
        let behind = self
            .durable_lsn
            .bytes_until(self.primary_end_lsn, self.lg_max);
        self.lag_bytes = fresh.then_some(behind);
        let since = match (self.caught_up_unix_ms, self.last_contact_unix_ms) {
            (0, 0) => now_ms,
            (0, contact) => contact,
            (caught_up, _) => caught_up,
        };
        self.lag_seconds = if fresh && behind == 0 {
            0.0
        } else {
            now_ms.saturating_sub(since) as f64 / 1000.0
        };
    }

    /// "1234 bytes" or "unknown (no word from the primary for 7.4 s)".
    pub fn lag_bytes_text(&self, now_ms: u64) -> String {
        match self.lag_bytes {
            Some(b) => format!("{b} bytes"),
            None if self.last_contact_unix_ms == 0 => "unknown bytes (no contact yet)".into(),
            None => format!(
                "unknown bytes (no word from the primary for {:.1} s)",
                now_ms.saturating_sub(self.last_contact_unix_ms) as f64 / 1000.0
            ),
        }
    }
}

/// The status of the standby directory, whether or not a standby runs.
pub fn read(dir: &StandbyDir) -> anyhow::Result<StandbyStatus> {
    let last: Option<StandbyStatus> = std::fs::read(dir.status_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let holder = dir.lock_holder();
    if let Some(pid) = holder {
        // Only the file the running process wrote describes it: one left
        // by an earlier process (the new one is still opening the mirror)
        // would say what was true before, e.g. "recoverable".
        if let Some(mut s) = last.clone().filter(|s| s.pid == Some(pid)) {
            s.running = true;
            // A `check` run beside the standby is newer than the one the
            // standby last wrote: the estimates follow the newest.
            if let Some(c) = crate::readiness::last_check(dir)
                .filter(|c| s.last_check.as_ref().is_none_or(|l| c.unix_ms > l.unix_ms))
            {
                s.last_check = Some(c);
                if let Ok(state) = dir.load_state() {
                    s.fill_from_state(&state);
                }
            }
            // A drill the archiver recorded since the status file was written.
            s.archive_drill = crate::archive::drill::last_report(dir).or(s.archive_drill);
            // Recomputed now: a status file written before a silence must
            // not keep reading "caught up".
            s.compute_lag(tandem_shared::now_unix_ms(), s.primary_silence_ms);
            return Ok(s);
        }
    }
    if !dir.state_path().exists() && !dir.meta().exists() {
        anyhow::bail!(
            "{} is not a Tandem standby directory (no .tandem inside)",
            dir.root.display()
        );
    }
    let state = dir.load_state()?;
    let tail = dir.scan_tail(&state)?;
    let mut s = last.unwrap_or_default();
    s.running = holder.is_some();
    s.pid = holder;
    s.connected = false;
    s.base_copy_active = false;
    s.durable_lsn = tail.durable;
    if s.lg_max == 0 {
        s.lg_max = tail.lg_max;
    }
    s.last_check = crate::readiness::last_check(dir).or(s.last_check);
    s.scrub = crate::scrub::last_report(dir).or(s.scrub);
    s.archive_drill = crate::archive::drill::last_report(dir).or(s.archive_drill);
    s.rejoining = false;
    s.discarded = crate::rejoin::reports(dir);
    s.compute_lag(tandem_shared::now_unix_ms(), 0);
    s.fill_from_state(&state);
    s.set_archive(crate::archive_hold::observe(dir));
    Ok(s)
}

/// Text for people.
// Long function: the text page line by line, in the order people read it.
pub fn render(s: &StandbyStatus) -> String {
    let when = |ms: u64| {
        if ms == 0 {
            "never".to_owned()
        } else {
            let ago = tandem_shared::now_unix_ms().saturating_sub(ms) as f64 / 1000.0;
            format!("{ago:.1} s ago")
        }
    };
    let mut out = format!(
        "role:         {}{}\nphase:        {}\nprimary:      {} ({})\nenvironment:  {}\nepoch:        {}\nprimary end:  {}\ndurable:      {}\nlag:          {}, {:.1} s\nrecoverable:  {}\nlast contact: {}\n",
        s.role,
        if s.running { format!(" (running, pid {})", s.pid.unwrap_or(0)) } else { " (not running)".into() },
        s.phase,
        s.primary.as_deref().unwrap_or("-"),
        if s.connected { "connected" } else { "not connected" },
        s.env_id.as_deref().unwrap_or("-"),
        s.epoch,
        s.primary_end_lsn,
        s.durable_lsn,
        s.lag_bytes_text(tandem_shared::now_unix_ms()),
        s.lag_seconds,
        if s.recoverable { "yes" } else { "no" },
        when(s.last_contact_unix_ms),
    );
    out.push_str(&format!(
        "history:      {}\n",
        tandem_shared::epochs::describe(&s.history)
    ));
    if s.base_copy_active {
        out.push_str(&format!("base copy:    {}\n", base_copy_progress(s)));
    }
    if s.rejoining {
        out.push_str("rejoin:       under way: the mirror is replaced once the page-delta base is complete\n");
    }
    for d in &s.discarded {
        out.push_str(&format!("discarded:    {d}\n"));
    }
    let cold = s.promotion_estimate_parts.map_or(0.0, |p| p.cold_reads);
    out.push_str(&format!(
        "promotion:    would replay {} bytes of log, about {:.1} s; promote about {:.2} s with the page cache cold ({:.2} s of it reading from disk)\n",
        s.replay_log_bytes, s.replay_estimate_seconds, s.promotion_estimate_seconds, cold
    ));
    match &s.last_check {
        Some(c) if c.ok => out.push_str(&format!(
            "last check:   passed {}, recovered to {} in {:.2} s{}\n",
            when(c.unix_ms),
            c.recovered_to.map(|l| l.to_string()).unwrap_or("-".into()),
            c.recovery_seconds,
            c.recovery_cpu_seconds
                .map(|cpu| format!(" ({cpu:.2} s of CPU)"))
                .unwrap_or_default()
        )),
        Some(c) => out.push_str(&format!(
            "last check:   FAILED {}: {}\n",
            when(c.unix_ms),
            c.error.as_deref().unwrap_or("?")
        )),
        None => out.push_str("last check:   none yet\n"),
    }
    out.push_str(&crate::scrub::render(s.scrub.as_ref()));
    out.push_str(&crate::archive::drill::render(s.archive_drill.as_ref()));
    match (&s.archive, s.archived_lsn) {
        (Some(a), Some(end)) => out.push_str(&format!(
            "archive:      {a} holds the log up to {end}; {} bytes of log held for it\n",
            s.archive_held_log_bytes
        )),
        _ => out.push_str("archive:      none registered (archive --follow registers one)\n"),
    }
    if let Some(e) = &s.last_error {
        out.push_str(&format!("last error:   {e}\n"));
    }
    if let Some(p) = &s.promotion {
        out.push_str(&format!(
            "promoted:     {} at epoch {}, recovered to {}\n",
            p.kind,
            p.epoch,
            p.recovered_to.map(|l| l.to_string()).unwrap_or("-".into())
        ));
    }
    out
}

/// "43% (440 of 1024 MiB), about 2 s left".
fn base_copy_progress(s: &StandbyStatus) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let (done, total) = (
        s.base_copy_done_bytes as f64,
        s.base_copy_total_bytes as f64,
    );
    if total <= 0.0 {
        return "starting".into();
    }
    let secs =
        tandem_shared::now_unix_ms().saturating_sub(s.base_copy_started_unix_ms) as f64 / 1000.0;
    let left = if done > 0.0 && secs > 0.0 {
        format!(
            ", about {:.0} s left",
            (total - done).max(0.0) * secs / done
        )
    } else {
        String::new()
    };
    format!(
        "{:.0}% ({:.0} of {:.0} MiB){left}",
        100.0 * done / total,
        done / MIB,
        total / MIB
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_unknown_and_growing_while_the_primary_is_silent() {
        let lsn = LogPosition::new;
        let base = StandbyStatus {
            lg_max: 1000,
            ..Default::default()
        };
        // (connected, durable, primary end, ms since contact, ms since
        // caught up) -> (lag_bytes, lag_seconds)
        let cases = [
            // Connected and caught up: no lag.
            (true, lsn(2, 100), lsn(2, 100), 300, 300, Some(0), 0.0),
            // Connected, behind: bytes known, seconds since caught up.
            (true, lsn(2, 100), lsn(3, 50), 300, 2_000, Some(950), 2.0),
            // Silent past the deadline: bytes unknown even though the last
            // word said "caught up", and the seconds count from it.
            (true, lsn(2, 100), lsn(2, 100), 7_400, 7_400, None, 7.4),
            // Not connected: unknown.
            (false, lsn(2, 100), lsn(2, 100), 1_000, 1_000, None, 1.0),
        ];
        let now = 1_000_000u64;
        for (connected, durable, end, contact_ago, caught_up_ago, bytes, secs) in cases {
            let mut s = StandbyStatus {
                connected,
                durable_lsn: durable,
                primary_end_lsn: end,
                last_contact_unix_ms: now - contact_ago,
                caught_up_unix_ms: now - caught_up_ago,
                ..base.clone()
            };
            s.compute_lag(now, 5_000);
            assert_eq!(
                (s.lag_bytes, s.lag_seconds),
                (bytes, secs),
                "{connected} {durable} {end}"
            );
        }
    }

    #[test]
    fn caught_up_counts_from_the_contact_not_from_the_apply() {
        let mut s = StandbyStatus {
            connected: true,
            lg_max: 1000,
            primary_end_lsn: LogPosition::new(2, 100),
            durable_lsn: LogPosition::new(2, 100),
            last_contact_unix_ms: 5_000,
            ..Default::default()
        };
        s.note_progress();
        assert_eq!(s.caught_up_unix_ms, 5_000);
        s.compute_lag(20_000, 5_000);
        assert_eq!((s.lag_bytes, s.lag_seconds), (None, 15.0));
        assert!(s
            .lag_bytes_text(20_000)
            .contains("unknown bytes (no word from the primary for 15.0 s)"));
    }

    #[test]
    fn base_copy_progress_reads_like_a_progress_bar() {
        let mut s = StandbyStatus {
            base_copy_active: true,
            base_copy_done_bytes: 256 << 20,
            base_copy_total_bytes: 1024 << 20,
            base_copy_started_unix_ms: tandem_shared::now_unix_ms() - 10_000,
            ..Default::default()
        };
        assert_eq!(
            base_copy_progress(&s),
            "25% (256 of 1024 MiB), about 30 s left"
        );
        assert!(render(&s).contains("base copy:    25%"));
        s.base_copy_total_bytes = 0;
        assert_eq!(base_copy_progress(&s), "starting");
    }
}
