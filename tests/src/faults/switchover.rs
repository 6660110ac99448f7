//! The planned switchover through etcd as a fault kind (`--etcd`,
//! `etcd-switchover`): mid-load, `tandem-standby switchover --to` one of
//! the standbys. Every other time it is asked first while the application
//! still runs: it must be refused (exit 4) and change nothing (the same
//! primary leads). Then the application stops and the switchover must go
//! through (exit 0) with the promises of an automatic failover (auto.rs):
//! never two leaders (sampled every 100 ms while the command runs), every
//! waited commit present, the old primary exits 7 by itself, the other
//! standby follows the new one with 0 database bytes re-sent, and beyond
//! them: the new primary holds every transaction the application
//! committed (a switchover loses nothing).

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::etcd_world::PRIMARY_NAME;
use super::world::{tail, World};
use crate::harness::{bin, Proc};

const LONG: Duration = Duration::from_secs(120);

impl World {
    pub(super) fn etcd_switchover(&mut self) -> Result<()> {
        let i = self.pick_standby();
        let to = self.standbys[i].name.clone();
        let live = self.switchovers.is_multiple_of(2);
        self.switchovers += 1;
        self.detail(format!(
            "-> {to}{}",
            if live {
                ", first while the application runs"
            } else {
                ""
            }
        ));
        // As an operator would: ask only once etcd shows the target as a
        // candidate (its member record, published every loop_wait, still
        // says "no recoverable base" for a moment after a standby that just
        // took a new base caught up). The refusal itself is right: it
        // changes nothing (switchover_etcd.rs tests it).
        if !self.wait_until(LONG, |w| Ok(w.ready_to_take_over(&to)))? {
            self.violation(format!(
                "liveness: {to} did not publish a recoverable base in the leader's epoch within {LONG:?}"
            ));
            return Ok(());
        }
        if live {
            let (code, out) = self.run_switchover(&to)?;
            self.count("switchovers refused while the application ran (exit 4)");
            if code != Some(4) || !out.contains("still open by") {
                self.violation(format!(
                    "a switchover to {to} while the application ran ended with {code:?}, not a refusal (exit 4): {}",
                    tail(&out, 3)
                ));
            }
            self.expect_same_primary("a refused switchover")?;
            if self.primary.is_none() {
                return Ok(());
            }
        }
        self.record_floors()?;
        self.stop_workload(false)?;
        let committed = self.max_t;
        let (code, out) = self.run_switchover(&to)?;
        if code != Some(0) {
            self.violation(format!(
                "the switchover to {to} with the application stopped failed ({code:?}): {}",
                tail(&out, 3)
            ));
            if self.leader().is_some_and(|l| l.name == PRIMARY_NAME) {
                return self.start_workload();
            }
            self.await_old_primary_exit()?;
            return self.take_over(None);
        }
        self.count("switchovers through etcd");
        self.await_old_primary_exit()?;
        self.must_hold_all = Some(committed);
        let r = self.take_over(None);
        self.must_hold_all = None;
        r
    }

    /// Whether etcd's view shows `name` publishing a recoverable base in
    /// the serving leader's epoch.
    fn ready_to_take_over(&self, name: &str) -> bool {
        let Some(view) = self.etcd.as_ref().and_then(|e| e.view()) else {
            return false;
        };
        let Some(leader) = view.leader else {
            return false;
        };
        view.members
            .iter()
            .any(|m| m.name == name && m.epoch == leader.epoch && m.recoverable)
    }

    /// Runs `tandem-standby switchover --to TO`, sampling the leaders
    /// while it runs: its exit code and output.
    fn run_switchover(&mut self, to: &str) -> Result<(Option<i32>, String)> {
        let Some(e) = &self.etcd else {
            return Ok((None, String::new()));
        };
        let mut cmd = Command::new(bin("tandem-standby"));
        cmd.args(["switchover", "--etcd", &e.cluster.endpoints(), "--cluster"])
            .arg(e.cluster_name())
            .args([
                "--to",
                to,
                "--timeout-secs",
                "60",
                "--catch-up-timeout-secs",
                "30",
            ]);
        let log = self.logs.join(format!("switchover-r{}.log", self.round));
        let mut p = Proc::spawn("switchover", cmd, &log)?;
        let mut code = None;
        self.wait_until(LONG, |_| {
            code = p.child.try_wait()?.map(|s| s.code());
            Ok(code.is_some())
        })?;
        if code.is_none() {
            p.kill9()?;
        }
        Ok((code.flatten(), p.log_text()))
    }
}
