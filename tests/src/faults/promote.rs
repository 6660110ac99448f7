//! The promotion faults: a failover after the primary's machine dies, a
//! promote while the application still commits on a reachable primary
//! (must be refused), a planned switchover; and turning a promoted standby,
//! once checked, into the next generation's primary.

use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::Result;

use super::history::Entry;
use super::world::{tail, World};
use crate::bdb;
use crate::harness::{bin, lsn_of, standby_status};

const LONG: Duration = Duration::from_secs(120);

impl World {
    pub(super) fn promote(
        &mut self,
        i: usize,
        catch_up_secs: u64,
    ) -> Result<(ExitStatus, serde_json::Value, String)> {
        let out = Command::new(bin("tandem-standby"))
            .env("NO_COLOR", "1")
            .args(["promote", "--json", "--catch-up-timeout-secs"])
            .arg(catch_up_secs.to_string())
            .arg("--dir")
            .arg(&self.standbys[i].dir)
            .output()?;
        self.count("promotions attempted");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        Ok((out.status, json, stderr))
    }

    /// After a successful promote: checks the promoted environment holds a
    /// prefix with everything the standby acknowledged (all of `must_hold`
    /// at least), and makes it the next generation's primary.
    pub(super) fn promote_into_next_generation(
        &mut self,
        i: usize,
        history: Vec<Entry>,
        promoted: bool,
    ) -> Result<()> {
        let name = self.standbys[i].name.clone();
        if !promoted {
            let (status, report, stderr) = self.promote(i, 10)?;
            if !status.success() {
                self.violation(format!(
                    "{name} could not be promoted ({status}): {} {report}",
                    tail(&stderr, 4)
                ));
                self.fresh_standby(i)?;
                return self.start_workload();
            }
        }
        self.stop_standby(i)?;
        let dir = self.standbys[i].dir.clone();
        self.count("promoted environments checked");
        let m = match bdb::check(&dir) {
            Ok(m) => m,
            Err(e) => {
                self.violation(format!("the promoted {name} fails the checker: {e:#}"));
                return self.new_generation(None);
            }
        };
        let floor = self.standbys[i].floor;
        if m < floor {
            self.violation(format!(
                "the promoted {name} holds 1..{m} but had acknowledged 1..{floor}"
            ));
        }
        if m < self.waited {
            self.violation(format!(
                "a waited commit was lost: the commit wait of transaction {} answered durable, and the \
                 promoted {name} holds 1..{m}",
                self.waited
            ));
        }
        if m > self.max_t + 1 {
            self.violation(format!(
                "the promoted {name} holds 1..{m}, more than was ever committed ({})",
                self.max_t
            ));
        }
        let history = history.into_iter().filter(|e| e.0 <= m).collect();
        self.new_generation(Some((dir, history, m)))
    }

    /// The primary's machine dies; the standby is promoted from what it holds.
    pub(super) fn promote_failover(&mut self) -> Result<()> {
        let i = self.pick_standby();
        self.detail(self.standbys[i].name.clone());
        self.stop_workload(true)?;
        self.kill_primary()?;
        self.wait_until(LONG, |w| {
            Ok(standby_status(&w.standbys[i].dir).is_ok_and(|s| s["connected"] == false))
        })?;
        let st = standby_status(&self.standbys[i].dir)?;
        let acked = self.lineage.acked_t(lsn_of(&st["durable_lsn"]));
        self.standbys[i].floor = self.standbys[i].floor.max(acked);
        let (status, report, stderr) = self.promote(i, 10)?;
        if !status.success() {
            self.violation(format!(
                "failover promote of {} failed ({status}): {} {report}",
                self.standbys[i].name,
                tail(&stderr, 4)
            ));
            return self.new_generation(None);
        }
        let history = self.lineage.entries.clone();
        self.promote_into_next_generation(i, history, true)
    }

    /// The application keeps committing on a reachable primary: promote
    /// must refuse (unless --force, which the driver never passes).
    pub(super) fn promote_live(&mut self) -> Result<()> {
        let i = self.pick_standby();
        self.detail(self.standbys[i].name.clone());
        let (status, report, _) = self.promote(i, 10)?;
        self.count("promotes tried while the application commits");
        if !status.success() {
            let role = standby_status(&self.standbys[i].dir)?["role"].clone();
            if role != "standby" {
                self.violation(format!(
                    "promote of {} failed but left role {role}",
                    self.standbys[i].name
                ));
            }
            if self.standby_exit(i).is_some() {
                self.note("a standby exited after a refused promote; restarted".into());
                self.start_standby(i, &[])?;
            }
            return Ok(());
        }
        let at = self.lineage.last_t();
        let still = self.wait_until(Duration::from_secs(30), |w| Ok(w.lineage.last_t() > at))?;
        self.violation(format!(
            "split brain: promote of {} succeeded (kind {}) while the application still committed on the \
             reachable primary{}",
            self.standbys[i].name,
            report["kind"],
            if still {
                format!(
                    "; it committed t={} after promote returned",
                    self.lineage.last_t()
                )
            } else {
                String::new()
            }
        ));
        self.stop_workload(true)?;
        let history = self.lineage.entries.clone();
        self.promote_into_next_generation(i, history, true)
    }

    /// A switchover: the application stops, then the standby is promoted
    /// and must hold every committed transaction.
    pub(super) fn promote_planned(&mut self) -> Result<()> {
        let i = self.pick_standby();
        self.detail(self.standbys[i].name.clone());
        self.stop_workload(false)?;
        let last = self.lineage.last_t();
        let (status, report, stderr) = self.promote(i, 60)?;
        if !status.success() {
            self.violation(format!(
                "planned switchover to {} refused ({status}) with the application stopped: {}",
                self.standbys[i].name,
                tail(&stderr, 4)
            ));
            return self.start_workload();
        }
        if report["kind"] != "switchover" {
            self.note(format!(
                "a planned switchover was reported as {}",
                report["kind"]
            ));
        }
        self.standbys[i].floor = self.standbys[i].floor.max(last);
        let history = self.lineage.entries.clone();
        self.promote_into_next_generation(i, history, true)
    }
}
