//! The campaign's checks: after each round every process is brought back
//! (as a supervisor would), every standby must catch up, and a copy of it
//! taken while it is frozen must recover to a committed prefix holding
//! everything it acknowledged. While the driver waits, a monitor compares
//! the primary's oldest log file with what each standby still needs.

use std::time::Duration;

use anyhow::Result;
use tandem_shared::envlayout::EnvLayout;

use super::world::{tail, World};
use crate::bdb;
use crate::harness::{copy_env, lsn_of, primary_log_end, standby_status};

/// What tandem-primary logs when a standby's next log file is gone.
const GAP_LOG: &str = "are gone from the primary";

/// Stops a process (SIGSTOP) for as long as the guard lives, so a copy of
/// its directory is a state it could crash in.
struct Frozen(i32);

impl Frozen {
    fn new(pid: u32) -> Result<Frozen> {
        let pid = pid as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let f = Frozen(pid);
        crate::harness::wait_for("the standby to stop", Duration::from_secs(30), || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            Ok(matches!(state, Some('T' | 't' | 'Z') | None))
        })?;
        Ok(f)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

impl World {
    /// Brings every process back and waits until each standby holds the
    /// primary's log as it was when this started.
    pub fn settle(&mut self) -> Result<()> {
        self.lineage.poll()?;
        if !self.primary_running() {
            if let Some(p) = &self.primary {
                let t = tail(&p.proc.log_text(), 6);
                self.violation(format!("tandem-primary exited on its own: {t}"));
            }
            self.kill_primary()?;
            self.start_primary()?;
        }
        if !self.workload.as_mut().is_some_and(|w| w.is_running()) {
            self.note("the application had exited; restarted with recovery".into());
            self.stop_workload(true)?;
            self.start_workload()?;
        }
        for i in 0..self.standbys.len() {
            self.revive(i)?;
        }
        self.settle_leadership()?;
        let target = primary_log_end(&self.env)?;
        let secs = self.cfg.settle_secs;
        for i in 0..self.standbys.len() {
            if self.standbys[i].diverged.is_some() {
                continue;
            }
            let mut last = serde_json::Value::Null;
            let caught_up = self.wait_until(Duration::from_secs(secs), |w| {
                w.revive(i)?;
                let Ok(s) = standby_status(&w.standbys[i].dir) else {
                    return Ok(false);
                };
                let fresh = s["updated_unix_ms"].as_u64().unwrap_or(0) >= w.standbys[i].started_ms;
                let ok = fresh && s["recoverable"] == true && lsn_of(&s["durable_lsn"]) >= target;
                last = s;
                Ok(ok)
            })?;
            self.count("standbys caught up after the round");
            if !caught_up {
                let t = self.standby_log_tail(i);
                self.violation(format!(
                    "liveness: {} did not catch up to {target} within {secs} s (phase {}, connected {}, \
                     durable {}, last_error {}): {t}",
                    self.standbys[i].name,
                    last["phase"],
                    last["connected"],
                    lsn_of(&last["durable_lsn"]),
                    last["last_error"]
                ));
                // A supervisor's last resort, so later rounds test something.
                self.kill_standby(i)?;
                self.start_standby(i, &[])?;
            }
        }
        Ok(())
    }

    /// Restarts a standby that exited, as systemd would; a refusal for good
    /// (exit 3) outside a rollback breaks a promise.
    pub fn revive(&mut self, i: usize) -> Result<()> {
        match self.standby_exit(i) {
            None if self.standbys[i].proc.is_some() => Ok(()),
            None => self.start_standby(i, &[]),
            Some(code) => {
                let t = self.standby_log_tail(i);
                if code == Some(3) {
                    self.violation(format!(
                        "{} refused for good (exit 3) after this fault: {t}",
                        self.standbys[i].name
                    ));
                    return self.fresh_standby(i);
                }
                self.note(format!(
                    "a standby exited with {code:?} during {}; restarted",
                    self.fault.split(' ').next().unwrap_or_default()
                ));
                self.standbys[i].proc = None;
                self.start_standby(i, &[])
            }
        }
    }

    pub fn check_invariants(&mut self) -> Result<()> {
        for i in 0..self.standbys.len() {
            if self.standbys[i].diverged.is_none() {
                self.check_copy(i)?;
            }
        }
        self.check_gaps();
        self.monitor_retention()?;
        for s in &mut self.standbys {
            s.log_damaged = false;
        }
        Ok(())
    }

    /// The primary's own word that it removed log a standby needed (the
    /// standby then needs a new base): the look in [`monitor_retention`]
    /// can miss it when the new base comes quickly, this cannot.
    fn check_gaps(&mut self) {
        let Some(p) = &self.primary else { return };
        let lines: Vec<String> = p
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains(GAP_LOG))
            .map(|l| l.to_string())
            .collect();
        self.count("primary logs read for gaps");
        for line in lines.iter().skip(self.gaps_seen) {
            let at = line.find("standby=").unwrap_or(0);
            let what = line[at..].chars().take(220).collect::<String>();
            let damaged = self
                .standbys
                .iter()
                .any(|s| s.log_damaged && what.starts_with(&format!("standby={} ", s.name)));
            if damaged {
                self.count("new bases after log damage at rest (the heal)");
                continue;
            }
            self.violation(format!(
                "the primary removed log files a standby still needed; it says: {what}"
            ));
        }
        self.gaps_seen = self.gaps_seen.max(lines.len());
    }

    /// Freezes standby `i`, copies its directory, thaws it, and proves the
    /// copy: recovery succeeds if status said recoverable, the checker
    /// finds an exact prefix 1..M, M covers every acknowledged transaction
    /// and nothing beyond what was committed.
    pub fn check_copy(&mut self, i: usize) -> Result<()> {
        let name = self.standbys[i].name.clone();
        let dir = self.standbys[i].dir.clone();
        let dest = self
            .root
            .join("checks")
            .join(format!("{name}-r{}", self.round));
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::create_dir_all(dest.parent().unwrap_or(&self.root))?;
        let (st, copied) = {
            // An exited (reaped) process is not signalled: its pid may be reused.
            let running = self.standby_exit(i).is_none();
            let _frozen = match self.standbys[i].proc.as_ref() {
                Some(p) if running => Some(Frozen::new(p.pid())?),
                _ => None,
            };
            let st = standby_status(&dir)?;
            let copied = if st["recoverable"] == true {
                copy_env(&dir, &dest).map(|_| true)
            } else {
                Ok(false)
            };
            (st, copied?)
        };
        if !copied {
            self.note("a standby was not recoverable at check time: no copy checked".into());
            return Ok(());
        }
        // Read what was committed only now: every transaction in the copy
        // was committed before the copy was taken, and the application
        // keeps committing while this runs (read before the copy, a copy
        // holding the commits of the last moments looked like invention).
        self.lineage.poll()?;
        self.max_t = self.max_t.max(self.lineage.last_t());
        let durable = lsn_of(&st["durable_lsn"]);
        let acked = self.lineage.acked_t(durable);
        let s = &mut self.standbys[i];
        s.floor = s.floor.max(acked);
        let floor = s.floor;
        self.count("standby copies recovered and checked");
        // What promote would do: recover, verify, then the exact prefix.
        let result = bdb::recover_catastrophic(&dest)
            .and_then(|_| bdb::verify(&dest, &bdb::WORKLOAD_DBS))
            .and_then(|_| bdb::check(&dest));
        let _ = std::fs::remove_dir_all(&dest);
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                let t = self.standby_log_tail(i);
                self.violation(format!(
                    "{name}'s status said recoverable (durable {durable}, phase {}) but a copy fails \
                     recovery, db_verify or the prefix check: {e:#} -- standby log: {t}",
                    st["phase"]
                ));
                // Started over, so later rounds test something.
                return self.fresh_standby(i);
            }
        };
        if m < floor {
            self.violation(format!(
                "{name} lost acknowledged transactions: it acknowledged 1..{floor}, a copy now holds 1..{m} \
                 (durable {durable})"
            ));
            self.standbys[i].floor = m;
        }
        if m > self.max_t + 1 {
            self.violation(format!(
                "{name} holds 1..{m}, more than was ever committed ({})",
                self.max_t
            ));
        }
        Ok(())
    }

    /// One look at retention: a standby that is recoverable needs
    /// the primary's log from its durable file on; the primary must still
    /// have that file. Confirmed with a status written after the look, so a
    /// status file that trails the standby's acknowledgements is no alarm.
    pub fn monitor_retention(&mut self) -> Result<()> {
        let Ok(layout) = EnvLayout::open(&self.env) else {
            return Ok(());
        };
        let Some(&oldest) = layout.log_files()?.first() else {
            return Ok(());
        };
        if self.retention_oldest != 0 && oldest > self.retention_oldest {
            for _ in self.retention_oldest..oldest {
                self.count("log files the primary removed (retention)");
            }
        }
        self.retention_oldest = self.retention_oldest.max(oldest);
        let looked = tandem_shared::now_unix_ms();
        for i in 0..self.standbys.len() {
            if self.standbys[i].diverged.is_some() || self.standbys[i].log_damaged {
                continue;
            }
            let Ok(s) = standby_status(&self.standbys[i].dir) else {
                continue;
            };
            if s["recoverable"] != true || s["base_copy_active"] == true {
                continue;
            }
            let stopped = self.standbys[i].proc.is_none() || self.standby_exit(i).is_some();
            if stopped {
                // Its files do not change: what they end at is final, and the
                // primary's record of it can only be older.
                self.count("retention looks (primary keeps what standbys need)");
                let d = lsn_of(&s["durable_lsn"]);
                if d.file != 0 && d.file < oldest {
                    self.violation(format!(
                        "the primary removed log files below {oldest} while the stopped {} still needed them \
                         (it holds log to {d})",
                        self.standbys[i].name
                    ));
                }
                continue;
            }
            if s["running"] != true {
                continue;
            }
            self.count("retention looks (primary keeps what standbys need)");
            let needs = lsn_of(&s["durable_lsn"]).file;
            if needs == 0 || needs >= oldest {
                continue;
            }
            // Suspicious: ask again once the standby has written a newer status.
            let dir = self.standbys[i].dir.clone();
            let mut again = None;
            crate::harness::wait_for("a newer status", Duration::from_secs(5), || {
                let s = standby_status(&dir)?;
                let newer = s["updated_unix_ms"].as_u64().unwrap_or(0) > looked;
                if newer {
                    again = Some(s);
                }
                Ok(newer)
            })
            .ok();
            if let Some(s) = again {
                let d = lsn_of(&s["durable_lsn"]);
                if s["recoverable"] == true && d.file < oldest {
                    self.violation(format!(
                        "the primary removed log files below {oldest} while {} still needed them \
                         (durable {d})",
                        self.standbys[i].name
                    ));
                }
            }
        }
        Ok(())
    }
}
