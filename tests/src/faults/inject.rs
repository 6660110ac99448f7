//! Injecting one fault per round, each held for a random number of commits
//! (a condition, not a sleep) and then healed as an operator or supervisor
//! would: processes restarted, links restored, disks freed, promoted
//! standbys turned into the next primary.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::LogPosition;

use super::world::World;
use super::{Fault, OnDivergence};
use crate::faulty_link::FaultyLink;
use crate::harness::{self, env_digest, lsn_of, primary_log_end, standby_status};

const LONG: Duration = Duration::from_secs(120);
/// How soon a cut or stalled link must show in status ("within seconds").
const NOTICE: Duration = Duration::from_secs(20);

/// What a link fault does to the bytes between a standby and its primary
/// (`FaultyLink::restore` ends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Each chunk waits this long before it is forwarded.
    Delay(Duration),
    /// A silent partition: connections stay open, new ones are accepted, and
    /// nothing is delivered until the mode changes (the held bytes are then
    /// delivered, as TCP retransmission would).
    Stall,
    /// A clean cut: open connections are shut down and new ones closed at once.
    Cut,
    /// A lossy network: each chunk is held, with this probability in
    /// percent, for a retransmission timeout.
    Lossy(u8),
}

impl LinkMode {
    /// Puts `link` in this mode alone (whatever the previous mode did stops).
    pub fn apply(self, link: &FaultyLink) {
        link.restore();
        match self {
            LinkMode::Delay(d) => link.delay(d.as_millis() as u64),
            LinkMode::Stall => link.cut(),
            LinkMode::Cut => link.sever(),
            LinkMode::Lossy(percent) => link.stall_randomly(f64::from(percent) / 100.0),
        }
    }
}

impl World {
    pub fn inject(&mut self, fault: Fault) -> Result<()> {
        self.fault = fault.name().to_string();
        self.ensure_tmpfs_room()?;
        if self.rng.random_bool(0.1) && fault != Fault::Rollback {
            self.take_snapshot()?;
        }
        match fault {
            Fault::KillStandby => {
                let i = self.pick_standby();
                self.detail(self.standbys[i].name.clone());
                self.kill_standby(i)?;
                self.hold()?;
                self.start_standby(i, &[])
            }
            Fault::KillPrimary if self.etcd.is_some() => self.kill_primary_briefly(),
            Fault::KillPrimary => {
                self.kill_primary()?;
                self.hold()?;
                self.start_primary()
            }
            Fault::KillApp => {
                self.stop_workload(true)?;
                self.start_workload()
            }
            Fault::Rollback => self.rollback(),
            Fault::DiskFull => self.disk_full(),
            Fault::LinkCut => self.link_fault(LinkMode::Cut),
            Fault::LinkStall => self.link_fault(LinkMode::Stall),
            Fault::LinkDelay => {
                let d = Duration::from_millis(self.rng.random_range(10..300));
                self.link_fault(LinkMode::Delay(d))
            }
            Fault::LinkLossy => {
                let percent = self.rng.random_range(2..30);
                self.link_fault(LinkMode::Lossy(percent))
            }
            Fault::FlipDb => self.flip(true),
            Fault::FlipLog => self.flip(false),
            Fault::PromoteFailover => self.promote_failover(),
            Fault::PromoteLive => self.promote_live(),
            Fault::PromotePlanned => self.promote_planned(),
            Fault::EtcdMember => self.etcd_member(),
            Fault::EtcdQuorum => self.etcd_quorum(),
            Fault::EtcdIsolate => self.etcd_isolate(),
            Fault::EtcdBlip => self.etcd_blip(),
            Fault::AutoFailover => self.auto_failover(),
            Fault::EtcdSwitchover => self.etcd_switchover(),
        }
    }

    pub(super) fn detail(&mut self, d: String) {
        self.fault = format!("{} {d}", self.fault);
    }

    pub(super) fn pick_standby(&mut self) -> usize {
        self.rng.random_range(0..self.standbys.len())
    }

    /// Holds a fault while the application commits a random number of
    /// transactions (between half a second and ten seconds of commits).
    pub(super) fn hold(&mut self) -> Result<()> {
        let rate = self.cfg.rate;
        let k = self.rng.random_range(rate / 2 + 1..=rate * 10 + 1);
        let from = self.lineage.last_t();
        if self.waited_file.is_some() {
            // An application that waits after each commit commits one
            // transaction per wait timeout (10 s) while no standby can
            // answer: the fault is held for the time k commits take at the
            // set rate instead.
            let held = Instant::now();
            let secs = Duration::from_secs_f64(k as f64 / rate as f64);
            self.wait_until(LONG, |w| {
                Ok(w.lineage.last_t() >= from + k || held.elapsed() >= secs)
            })?;
            return Ok(());
        }
        if !self.wait_until(LONG, |w| Ok(w.lineage.last_t() >= from + k))? {
            self.note("the application committed nothing for 120 s during a fault".into());
        }
        Ok(())
    }

    fn link_fault(&mut self, mode: LinkMode) -> Result<()> {
        // In the etcd world every standby follows the one address the
        // primary advertises (the first link): a link fault hits them all.
        let all = self.rng.random_bool(0.3) || self.etcd.is_some();
        let which: Vec<usize> = if all {
            (0..self.standbys.len()).collect()
        } else {
            vec![self.pick_standby()]
        };
        self.detail(format!(
            "{:?} on {}",
            mode,
            which
                .iter()
                .map(|i| self.standbys[*i].name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
        let links: Vec<usize> = if self.etcd.is_some() {
            vec![0]
        } else {
            which.clone()
        };
        for i in &links {
            mode.apply(&self.standbys[*i].link);
        }
        if matches!(mode, LinkMode::Cut | LinkMode::Stall) {
            for &i in &which {
                self.count("dead links noticed in status");
                let mut last = serde_json::Value::Null;
                let noticed = self.wait_until(NOTICE, |w| {
                    let Ok(s) = standby_status(&w.standbys[i].dir) else {
                        return Ok(false);
                    };
                    let seen = s["connected"] == false
                        || s["lag_bytes"].as_u64().unwrap_or(0) > 0
                        || s["lag_seconds"].as_f64().unwrap_or(0.0) > 2.0;
                    last = s;
                    Ok(seen)
                })?;
                if !noticed {
                    self.violation(format!(
                        "{} link {:?} for {NOTICE:?} while the application committed, yet status reads healthy: \
                         connected={} lag_bytes={} lag_seconds={} last_contact_unix_ms={} (now {})",
                        self.standbys[i].name,
                        mode,
                        last["connected"],
                        last["lag_bytes"],
                        last["lag_seconds"],
                        last["last_contact_unix_ms"],
                        tandem_shared::now_unix_ms()
                    ));
                }
            }
        }
        self.hold()?;
        for i in &links {
            self.standbys[*i].link.restore();
        }
        Ok(())
    }

    fn disk_full(&mut self) -> Result<()> {
        let Some(mount) = self.tmpfs_path() else {
            return Ok(());
        };
        let filler = mount.join("filler");
        let mut f = std::fs::File::create(&filler)?;
        let chunk = vec![0u8; 1 << 20];
        let mut written: u64 = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).context("fill the standby's disk"),
            }
        }
        drop(f);
        self.detail(format!("s0 filled with {} MiB", written >> 20));
        self.hold()?;
        std::fs::remove_file(&filler)?;
        Ok(())
    }

    /// Flips one byte of a mirror file while the standby is stopped.
    fn flip(&mut self, database: bool) -> Result<()> {
        let i = self.pick_standby();
        self.stop_standby(i)?;
        let dir = self.standbys[i].dir.clone();
        let durable = lsn_of(&standby_status(&dir)?["durable_lsn"]);
        let mut candidates: Vec<(PathBuf, u64)> = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata()?.len();
            if database && name.ends_with(".db") && len > 0 {
                candidates.push((e.path(), len));
            }
            if !database {
                if let Some(n) = name
                    .strip_prefix("log.")
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    // Only bytes the standby counts as durable.
                    let limit = match n.cmp(&durable.file) {
                        std::cmp::Ordering::Less => len,
                        std::cmp::Ordering::Equal => len.min(u64::from(durable.offset)),
                        std::cmp::Ordering::Greater => 0,
                    };
                    if limit > 0 {
                        candidates.push((e.path(), limit));
                    }
                }
            }
        }
        if candidates.is_empty() {
            self.detail(format!("{}: nothing to flip", self.standbys[i].name));
            return self.start_standby(i, &[]);
        }
        candidates.sort();
        let (path, limit) = candidates[self.rng.random_range(0..candidates.len())].clone();
        let offset = self.rng.random_range(0..limit);
        let mask: u8 = self.rng.random_range(1..=255);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset)?;
        let old = b[0];
        b[0] ^= mask;
        f.write_all_at(&b, offset)?;
        f.sync_all()?;
        self.detail(format!(
            "{} {} @ {offset}: {old:#04x} -> {:#04x}",
            self.standbys[i].name,
            path.file_name().unwrap_or_default().to_string_lossy(),
            b[0]
        ));
        let flipped_ms = tandem_shared::now_unix_ms();
        self.standbys[i].log_damaged = !database;
        self.start_standby(i, &[])?;
        if self.has_standby_flag("--scrub-interval-secs") {
            // Nothing can know of a silent flip before reading it: the
            // promise is that a scrub finds it (status not recoverable) and
            // it is healed, so the checks wait for a scrub after the flip.
            let secs = self.cfg.settle_secs;
            let scrubbed = self.wait_until(Duration::from_secs(secs), |w| {
                Ok(standby_status(&w.standbys[i].dir)
                    .is_ok_and(|s| s["scrub"]["unix_ms"].as_u64().unwrap_or(0) > flipped_ms))
            })?;
            self.count("scrubs after a flipped byte");
            if !scrubbed {
                let tail = self.standby_log_tail(i);
                self.violation(format!(
                    "liveness: {} ran no scrub within {secs} s of a flipped byte: {tail}",
                    self.standbys[i].name
                ));
            }
        }
        Ok(())
    }

    /// The primary comes back with an older environment (power loss before
    /// the log was synced, or a restored backup): its own state directory
    /// survives, the BDB files are the snapshot's.
    fn rollback(&mut self) -> Result<()> {
        let Some(snap) = self.snapshot.clone() else {
            return self.take_snapshot();
        };
        self.detail(format!("to t={}", snap.t));
        self.stop_workload(true)?;
        self.kill_primary()?;
        let old_history = self.lineage.entries.clone();
        let mut before = Vec::new();
        for i in 0..self.standbys.len() {
            // Quiet first, so the digest is of what it holds, not a write
            // in flight.
            self.wait_until(LONG, |w| {
                Ok(standby_status(&w.standbys[i].dir).is_ok_and(|s| s["connected"] == false))
            })?;
            let st = standby_status(&self.standbys[i].dir)?;
            let durable = lsn_of(&st["durable_lsn"]);
            let acked = self.lineage.acked_t(durable);
            self.standbys[i].floor = self.standbys[i].floor.max(acked);
            before.push((env_digest(&self.standbys[i].dir)?, durable));
        }
        replace_bdb_files(&self.env, &snap.dir)?;
        self.retention_oldest = 0;
        self.lineage.truncate_to(snap.t);
        self.start_primary()?;
        let mut refused = Vec::new();
        #[allow(clippy::needless_range_loop)] // `i` names the standby to every helper
        for i in 0..self.standbys.len() {
            let env = self.env.clone();
            let mut outcome = None;
            self.wait_until(LONG, |w| {
                if let Some(code) = w.standby_exit(i) {
                    outcome = Some(Err(code));
                    return Ok(true);
                }
                let Ok(s) = standby_status(&w.standbys[i].dir) else {
                    return Ok(false);
                };
                let d = lsn_of(&s["durable_lsn"]);
                if s["recoverable"] == true && s["connected"] == true && d == primary_log_end(&env)?
                {
                    outcome = Some(Ok(d));
                    return Ok(true);
                }
                Ok(false)
            })?;
            let name = self.standbys[i].name.clone();
            let (digest, held) = before[i].clone();
            match outcome {
                Some(Err(Some(3))) => {
                    self.count("refusals of a shorter primary, directory unchanged");
                    if env_digest(&self.standbys[i].dir)? != digest {
                        self.violation(format!(
                            "{name} refused the rolled-back primary (exit 3) but changed its directory"
                        ));
                    }
                    self.standbys[i].diverged = Some(old_history.clone());
                    refused.push(i);
                }
                Some(Err(code)) => {
                    let tail = self.standby_log_tail(i);
                    self.violation(format!(
                        "{name} exited with {code:?} when the primary came back rolled back to t={} \
                         (expected: refuse with exit 3 or lose nothing): {tail}",
                        snap.t
                    ));
                    self.fresh_standby(i)?;
                }
                Some(Ok(now)) => {
                    if now < held {
                        // Reported once here; the copy check below then
                        // proves what it holds now.
                        let acked = self.standbys[i].floor;
                        self.standbys[i].floor = snap.t.min(acked);
                        self.violation(format!(
                            "{name} held log to {held} (transactions 1..{acked}) and now follows the rolled-back \
                             primary at {now}: it discarded acknowledged transactions instead of refusing"
                        ));
                    }
                    // Before the application reuses the transaction numbers.
                    self.check_copy(i)?;
                }
                None => {
                    let tail = self.standby_log_tail(i);
                    self.violation(format!(
                        "liveness: {name} neither refused nor followed the rolled-back primary within {LONG:?}: {tail}"
                    ));
                    self.fresh_standby(i)?;
                }
            }
        }
        if refused.is_empty() {
            return self.start_workload();
        }
        match self.cfg.on_divergence {
            OnDivergence::Promote => {
                let best = *refused
                    .iter()
                    .max_by_key(|i| before[**i].1)
                    .unwrap_or(&refused[0]);
                self.detail(format!("-> promote {}", self.standbys[best].name));
                // The operator gives up on the rolled-back primary: a
                // failover from what the standby durably holds.
                self.kill_primary()?;
                let history = self.standbys[best].diverged.clone().unwrap_or_default();
                self.promote_into_next_generation(best, history, false)
            }
            OnDivergence::StartOver => {
                self.detail("-> start over".into());
                for i in refused {
                    self.start_over(i)?;
                }
                self.start_workload()
            }
        }
    }

    fn start_over(&mut self, i: usize) -> Result<()> {
        if !self.has_standby_flag("--start-over") {
            self.note(
                "this build has no --start-over: the driver emptied the directory instead".into(),
            );
            return self.fresh_standby(i);
        }
        let old_base = standby_status(&self.standbys[i].dir)?["base_id"].clone();
        self.standbys[i].proc = None;
        self.start_standby(i, &["--start-over"])?;
        let mut code = None;
        // It holds the old history until the new base is swapped in.
        let done = self.wait_until(LONG, |w| {
            if let Some(c) = w.standby_exit(i) {
                code = Some(c);
                return Ok(true);
            }
            Ok(standby_status(&w.standbys[i].dir)
                .is_ok_and(|s| s["recoverable"] == true && s["base_id"] != old_base))
        })?;
        if !done {
            let tail = self.standby_log_tail(i);
            self.violation(format!(
                "liveness: {} --start-over took no new base within {LONG:?}: {tail}",
                self.standbys[i].name
            ));
            return self.fresh_standby(i);
        }
        match code {
            None => {
                self.standbys[i].floor = 0;
                self.standbys[i].diverged = None;
            }
            Some(Some(2)) => {
                self.note(
                    "this build has no --start-over: the driver emptied the directory instead"
                        .into(),
                );
                self.fresh_standby(i)?;
            }
            Some(c) => {
                let tail = self.standby_log_tail(i);
                self.violation(format!(
                    "{} --start-over exited with {c:?}: {tail}",
                    self.standbys[i].name
                ));
                self.fresh_standby(i)?;
            }
        }
        Ok(())
    }
}

/// Replaces the environment's BDB files (databases, logs, regions) with
/// the snapshot's, keeping Tandem's state directories, as a power loss or a
/// restore of the BDB files would.
fn replace_bdb_files(env: &Path, snapshot: &Path) -> Result<()> {
    for e in std::fs::read_dir(env)? {
        let e = e?;
        let name = e.file_name();
        if name == ".tandem" || name == ".tandem-primary" {
            continue;
        }
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    let st = Command::new("sh")
        .arg("-c")
        .arg("cp -a \"$0\"/. \"$1\"/")
        .arg(snapshot)
        .arg(env)
        .status()?;
    if !st.success() {
        anyhow::bail!(
            "copying {} into {} failed",
            snapshot.display(),
            env.display()
        );
    }
    // The log must look like the snapshot's, not like a newer one.
    let _ = EnvLayout::open(env)?;
    let _: LogPosition = harness::primary_log_end(env)?;
    Ok(())
}
