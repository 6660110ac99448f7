//! The etcd faults and the automatic failover rounds (`--etcd`): an etcd
//! member killed, the quorum lost, the primary cut off from etcd (for a
//! moment, or until a standby promotes itself), and kill -9 of the
//! primary's machine. After a standby promoted itself: the promoted
//! environment holds everything its standby acknowledged and every
//! transaction whose commit wait answered durable, the application
//! continues on it, the other standby follows it, the old primary
//! restarted exits 7; then the world is re-formed from it.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::Rng;
use tandem_coord::records::{LeaderRecord, LeaderState};

use super::etcd_world::PRIMARY_NAME;
use super::world::{tail, World};
use crate::harness::{bin, lsn_of, standby_status, Proc};

const LONG: Duration = Duration::from_secs(120);

impl World {
    fn ttl(&self) -> Duration {
        self.etcd
            .as_ref()
            .map_or(Duration::from_secs(10), |e| e.timing.ttl)
    }

    /// The leader key now (None: nobody, or etcd did not answer).
    pub(super) fn leader(&self) -> Option<LeaderRecord> {
        self.etcd.as_ref()?.view()?.leader
    }

    /// Waits until etcd names a serving primary and, when that is this
    /// world's primary, it says it acts (a leader key that outlived a lost
    /// quorum names a primary that may still be fenced).
    fn wait_serving(&mut self, timeout: Duration) -> Result<Option<LeaderRecord>> {
        let mut found = None;
        self.wait_until(timeout, |w| {
            found = w
                .leader()
                .filter(|l| l.state == LeaderState::Primary && l.address.is_some());
            Ok(match &found {
                Some(l) if l.name == PRIMARY_NAME => w.primary_acting(),
                Some(_) => true,
                None => false,
            })
        })?;
        Ok(found)
    }

    fn primary_acting(&mut self) -> bool {
        let Some(p) = &self.primary else { return false };
        let url = format!("https://{}", p.addr);
        let tls = self.tls_files();
        self.etcd.as_mut().is_some_and(|e| e.acting(&url, &tls))
    }

    /// Waits until a standby serves as primary (or the primary process
    /// exits, when `or_primary_exit`); the winner's record.
    fn wait_standby_leads(&mut self, timeout: Duration) -> Result<Option<LeaderRecord>> {
        let mut found = None;
        self.wait_until(timeout, |w| {
            found = w.leader().filter(|l| {
                l.name != PRIMARY_NAME && l.state == LeaderState::Primary && l.address.is_some()
            });
            Ok(found.is_some())
        })?;
        Ok(found)
    }

    /// Every standby's floor raised to what it acknowledged so far.
    pub(super) fn record_floors(&mut self) -> Result<()> {
        self.lineage.poll()?;
        for i in 0..self.standbys.len() {
            if let Ok(st) = standby_status(&self.standbys[i].dir) {
                let acked = self.lineage.acked_t(lsn_of(&st["durable_lsn"]));
                self.standbys[i].floor = self.standbys[i].floor.max(acked);
            }
        }
        Ok(())
    }

    /// In the etcd world: the primary acts as primary again (after a
    /// quorum loss it resumes a few loop waits after etcd answers).
    pub(super) fn settle_leadership(&mut self) -> Result<()> {
        if self.etcd.is_none() {
            return Ok(());
        }
        if !self.wait_until(LONG, |w| Ok(w.primary_acting()))? {
            let t = self
                .primary
                .as_ref()
                .map(|p| tail(&p.proc.log_text(), 4))
                .unwrap_or_default();
            self.violation(format!(
                "liveness: the primary did not act as primary within {LONG:?} of the round's end: {t}"
            ));
        }
        Ok(())
    }

    /// kill -9 of tandem-primary alone, restarted at once (a supervisor,
    /// well within the ttl): it takes its own lease back; no failover.
    pub(super) fn kill_primary_briefly(&mut self) -> Result<()> {
        self.kill_primary()?;
        let started = self.start_primary();
        if started.is_ok() {
            if let Some(l) = self.wait_serving(LONG)? {
                if l.name == PRIMARY_NAME {
                    self.count("primaries restarted within the ttl and leading again");
                    return Ok(());
                }
            }
        }
        // Restarted too late: a standby took over meanwhile, while the
        // application still committed here (tandem-primary was not there to
        // run --on-fence). A real deployment needs a watchdog for this.
        self.note(format!(
            "kill-primary: the restart came after the ttl and a standby promoted itself ({})",
            started
                .err()
                .map_or("leader changed".into(), |e| format!("{e:#}"))
        ));
        self.stop_workload(true)?;
        self.kill_primary()?;
        self.take_over(None)
    }

    /// kill -9 of the application and the primary: a standby promotes
    /// itself.
    pub(super) fn auto_failover(&mut self) -> Result<()> {
        self.record_floors()?;
        self.stop_workload(true)?;
        self.kill_primary()?;
        let killed = Instant::now();
        self.take_over(Some(killed))
    }

    /// One etcd member of three killed for a while: nothing changes.
    pub(super) fn etcd_member(&mut self) -> Result<()> {
        let m = self.rng.random_range(0..crate::etcd::MEMBERS);
        self.detail(format!("m{m}"));
        let fences = self.etcd.as_ref().map_or(0, |e| e.fence_count());
        if let Some(e) = &mut self.etcd {
            e.cluster.kill(m)?;
        }
        self.hold()?;
        if let Some(e) = &mut self.etcd {
            e.cluster.restart(m)?;
            e.cluster.wait_healthy(LONG)?;
        }
        self.count("etcd members killed: nothing changed");
        let fenced = self.etcd.as_ref().map_or(0, |e| e.fence_count()) > fences;
        if fenced {
            self.violation(format!(
                "the primary fenced itself when one etcd member of three (m{m}) died"
            ));
        }
        self.expect_same_primary("one etcd member died")
    }

    /// The primary cut off from etcd for a moment below the ttl: no failover.
    pub(super) fn etcd_blip(&mut self) -> Result<()> {
        let ttl = self.ttl();
        let blip = ttl / 3;
        self.detail(format!("{} ms", blip.as_millis()));
        let fences = self.etcd.as_ref().map_or(0, |e| e.fence_count());
        self.set_isolated(true);
        let cut = Instant::now();
        self.wait_until(blip * 2, |_| Ok(cut.elapsed() >= blip))?;
        self.set_isolated(false);
        // Twice the ttl: a failover it caused would have happened by then.
        let healed = Instant::now();
        self.wait_until(ttl * 3, |_| Ok(healed.elapsed() >= ttl * 2))?;
        self.count("blips below the ttl: no failover");
        if self.etcd.as_ref().map_or(0, |e| e.fence_count()) > fences {
            self.note(format!(
                "etcd-blip: a {} ms blip fenced the primary (it resumed)",
                blip.as_millis()
            ));
        }
        self.expect_same_primary("a blip below the ttl")
    }

    fn set_isolated(&mut self, cut: bool) {
        if let Some(e) = &self.etcd {
            e.isolate_primary(cut);
        }
    }

    /// After a fault that must not cause a failover: the same primary leads.
    pub(super) fn expect_same_primary(&mut self, what: &str) -> Result<()> {
        let Some(l) = self.wait_serving(LONG)? else {
            self.violation(format!(
                "liveness: no primary served for {LONG:?} after {what}"
            ));
            return self.new_generation(None);
        };
        if l.name == PRIMARY_NAME {
            return Ok(());
        }
        self.violation(format!(
            "a failover after {what}: {} (epoch {}) promoted itself",
            l.name, l.epoch
        ));
        self.stop_workload(true)?;
        self.kill_primary()?;
        self.take_over(None)
    }

    /// Two of three etcd members killed for at least twice the ttl: no
    /// promotion, the primary fences; then the quorum returns.
    pub(super) fn etcd_quorum(&mut self) -> Result<()> {
        let ttl = self.ttl();
        let keep = self.rng.random_range(0..crate::etcd::MEMBERS);
        let hold =
            ttl * 2 + Duration::from_millis(self.rng.random_range(0..ttl.as_millis() as u64));
        self.detail(format!("m{keep} alone for {} ms", hold.as_millis()));
        let fences = self.etcd.as_ref().map_or(0, |e| e.fence_count());
        let lost_ms = tandem_shared::now_unix_ms();
        if let Some(e) = &mut self.etcd {
            for m in (0..crate::etcd::MEMBERS).filter(|m| *m != keep) {
                e.cluster.kill(m)?;
            }
        }
        let lost = Instant::now();
        self.wait_until(hold * 2, |_| Ok(lost.elapsed() >= hold))?;
        self.count("quorum losses: primary fenced, nobody promoted");
        if self.etcd.as_ref().map_or(0, |e| e.fence_count()) <= fences {
            self.violation(format!(
                "the primary did not fence (--on-fence never ran) in {} ms without an etcd quorum",
                hold.as_millis()
            ));
        }
        if let Some(e) = &mut self.etcd {
            for m in 0..crate::etcd::MEMBERS {
                e.cluster.restart(m)?;
            }
            e.cluster.wait_healthy(LONG)?;
        }
        let back_ms = tandem_shared::now_unix_ms();
        let Some(l) = self.wait_serving(LONG)? else {
            self.violation(format!(
                "liveness: no primary served within {LONG:?} of the quorum's return"
            ));
            return self.new_generation(None);
        };
        if l.name == PRIMARY_NAME {
            self.count("primaries leading again after the quorum returned");
            return Ok(());
        }
        // Legal only once the quorum was back.
        let f = self.etcd.as_ref().and_then(|e| e.last_failover());
        if let Some(f) = &f {
            if f.unix_ms < back_ms && f.unix_ms >= lost_ms {
                self.violation(format!(
                    "{} promoted itself (epoch {}) at {} ms, while etcd had no quorum ({lost_ms}..{back_ms})",
                    f.name, f.epoch, f.unix_ms
                ));
            }
        }
        self.note("etcd-quorum: a standby promoted itself once the quorum returned".into());
        self.stop_workload(true)?;
        self.await_old_primary_exit()?;
        self.take_over(None)
    }

    /// The primary cut off from etcd until a standby promotes itself: it
    /// must fence first (its --on-fence stops the application), and exit 7
    /// once the links heal and it sees the new epoch.
    pub(super) fn etcd_isolate(&mut self) -> Result<()> {
        // Every other time the application stops only a moment after the
        // fence (its --on-fence stop is slow): it commits on the fenced
        // primary, which ships nothing any more, so the standbys are behind
        // a primary that is still reachable. The winner cannot get the rest
        // and must fail over from what it holds.
        let slow_stop = self.isolations.is_multiple_of(2);
        self.isolations += 1;
        let fences = self.etcd.as_ref().map_or(0, |e| e.fence_count());
        if slow_stop {
            self.detail("with a slow application stop".into());
            if let Some(e) = &self.etcd {
                let _ = std::fs::remove_file(&e.app_pid);
            }
        }
        self.record_floors()?;
        self.set_isolated(true);
        let cut = Instant::now();
        let limit = self.ttl() * 2 + Duration::from_secs(60);
        if slow_stop {
            self.wait_until(limit, |w| {
                Ok(w.etcd.as_ref().map_or(0, |e| e.fence_count()) > fences)
            })?;
            let at = self.lineage.last_t();
            let fenced = Instant::now();
            self.wait_until(LONG, |w| {
                Ok(w.lineage.last_t() >= at + 5 || fenced.elapsed() >= Duration::from_secs(1))
            })?;
            self.stop_workload(true)?;
        }
        let winner = self.wait_standby_leads(limit)?;
        let fenced = self.etcd.as_ref().map_or(0, |e| e.fence_count()) > fences;
        let app_alive = self.workload.as_mut().is_some_and(|w| w.is_running());
        self.set_isolated(false);
        let Some(winner) = winner else {
            self.violation(format!(
                "liveness: no standby promoted itself within {limit:?} of the primary's isolation from etcd"
            ));
            return self.new_generation(None);
        };
        self.count("isolated primaries fenced before a standby promoted");
        if !fenced {
            self.violation(format!(
                "{} promoted itself {} ms after the primary was cut off from etcd, and the primary had not \
                 fenced (its --on-fence had not run)",
                winner.name,
                cut.elapsed().as_millis()
            ));
        }
        if app_alive {
            self.violation(format!(
                "{} promoted itself while the isolated primary's application still ran (--on-fence did not stop it)",
                winner.name
            ));
        }
        self.stop_workload(true)?;
        self.await_old_primary_exit()?;
        self.take_over(None)
    }

    /// The fenced old primary, its links to etcd healed, must see the new
    /// epoch and exit 7 by itself.
    pub(super) fn await_old_primary_exit(&mut self) -> Result<()> {
        let Some(mut p) = self.primary.take() else {
            return Ok(());
        };
        let url = format!("https://{}", p.addr);
        let limit = self.ttl() * 2 + Duration::from_secs(30);
        let mut code = None;
        let started = Instant::now();
        while started.elapsed() < limit {
            self.sample_leaders(false);
            if let Ok(Some(st)) = p.proc.child.try_wait() {
                code = Some(st.code());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match code {
            Some(Some(7)) => self.count("old primaries that exited 7 on the new epoch"),
            Some(c) => {
                let t = tail(&p.proc.log_text(), 4);
                self.violation(format!(
                    "the superseded primary exited with {c:?}, not 7: {t}"
                ));
            }
            None => {
                let t = tail(&p.proc.log_text(), 4);
                self.violation(format!(
                    "the superseded primary still ran {limit:?} after its links to etcd healed: {t}"
                ));
                p.proc.kill9()?;
            }
        }
        if let Some(e) = &mut self.etcd {
            e.forget(&url);
        }
        Ok(())
    }

    /// The primary is gone (killed or superseded, its application
    /// stopped): a standby must promote itself; then everything the round
    /// promises about it is checked and the world re-formed from it.
    /// `killed`: when the primary's machine died (for the failover time).
    pub(super) fn take_over(&mut self, killed: Option<Instant>) -> Result<()> {
        let limit = self.ttl() * 2 + Duration::from_secs(60);
        let Some(leader) = self.wait_standby_leads(limit)? else {
            let states: Vec<String> = (0..self.standbys.len())
                .map(|i| {
                    let e = std::fs::read_to_string(self.standbys[i].dir.join(".tandem/etcd.json"))
                        .unwrap_or_default();
                    format!("{}: {}", self.standbys[i].name, e.replace('\n', " "))
                })
                .collect();
            self.violation(format!(
                "liveness: no standby promoted itself within {limit:?}: {}",
                states.join("; ")
            ));
            return self.new_generation(None);
        };
        let Some(i) = self.standbys.iter().position(|s| s.name == leader.name) else {
            self.violation(format!("etcd names an unknown leader {}", leader.name));
            return self.new_generation(None);
        };
        self.detail(format!("-> {} promoted itself", leader.name));
        self.count("automatic promotions");
        for j in (0..self.standbys.len()).filter(|j| *j != i) {
            let role = standby_status(&self.standbys[j].dir)
                .map(|s| s["role"].clone())
                .unwrap_or_default();
            if role != "standby" || self.standby_exit(j).is_some() {
                self.violation(format!(
                    "{} promoted itself, and {} is no longer a running standby (role {role})",
                    leader.name, self.standbys[j].name
                ));
            }
        }
        self.after_promotion(i, &leader, killed)
    }

    /// The promises about what the promoted standby `i` holds (1..`m0`):
    /// everything it acknowledged, every transaction whose commit wait
    /// answered durable, nothing never committed. The exact prefix is
    /// proved when the world is re-formed from it.
    fn check_promoted(&mut self, i: usize, m0: u64, waited: u64) {
        let name = self.standbys[i].name.clone();
        let floor = self.standbys[i].floor;
        if m0 < floor {
            self.violation(format!(
                "{name} promoted itself holding 1..{m0} but had acknowledged 1..{floor}"
            ));
        }
        self.count("waited commits checked at an automatic promotion");
        if let Some(all) = self.must_hold_all.filter(|all| m0 < *all) {
            self.violation(format!(
                "a switchover lost committed transactions: the application had committed 1..{all} and stopped, \
                 and {name} took over holding 1..{m0}"
            ));
        }
        if m0 < waited {
            self.violation(format!(
                "a waited commit was lost: the commit wait of transaction {waited} answered durable, and {name} \
                 promoted itself holding 1..{m0}"
            ));
        }
        if m0 > self.max_t + 1 {
            self.violation(format!(
                "{name} promoted itself holding 1..{m0}, more than was ever committed ({})",
                self.max_t
            ));
        }
    }

    /// The application continues on the promoted primary at once; what the
    /// promoted environment held is where it continues from (its first
    /// transaction's number minus one). None: it committed nothing.
    fn continue_on_promoted(&mut self, i: usize, killed: Option<Instant>) -> Result<Option<u64>> {
        let old = std::mem::take(&mut self.lineage.entries);
        self.env = self.standbys[i].dir.clone();
        self.start_workload()?;
        let committed = self.wait_until(LONG, |w| Ok(w.lineage.last_t() > 0))?;
        if !committed {
            let t = self
                .workload
                .as_ref()
                .map(|w| tail(&w.log_text(), 4))
                .unwrap_or_default();
            self.violation(format!(
                "liveness: the application committed nothing on the promoted {} within {LONG:?}: {t}",
                self.standbys[i].name
            ));
            return Ok(None);
        }
        if let (Some(k), Some(e)) = (killed, &mut self.etcd) {
            e.failover_times.push(k.elapsed());
        }
        let m0 = self.lineage.entries[0].0.saturating_sub(1);
        let new = std::mem::take(&mut self.lineage.entries);
        self.lineage.entries = old.into_iter().filter(|e| e.0 <= m0).collect();
        self.lineage.entries.extend(new);
        Ok(Some(m0))
    }

    // Long function: the failover round's promises in the order they
    // happen (application continues, what the promoted holds, old primary
    // refused, the other standby follows, re-formed world).
    fn after_promotion(
        &mut self,
        i: usize,
        leader: &LeaderRecord,
        killed: Option<Instant>,
    ) -> Result<()> {
        let old_env = self.env.clone();
        // Waits the application gets answered on the promoted primary are
        // beyond m0; the promise is about those answered before.
        let waited = self.waited;
        let Some(m0) = self.continue_on_promoted(i, killed)? else {
            return self.new_generation(None);
        };
        self.check_promoted(i, m0, waited);
        self.old_primary_refused(&old_env)?;
        let address = self.leader().and_then(|l| l.address).unwrap_or_default();
        for j in (0..self.standbys.len()).filter(|j| *j != i) {
            let bytes_before = standby_status(&self.standbys[j].dir)
                .map(|s| s["file_bytes_received"].as_u64().unwrap_or(0))
                .unwrap_or(0);
            let mut last = serde_json::Value::Null;
            let followed = self.wait_until(LONG, |w| {
                let Ok(s) = standby_status(&w.standbys[j].dir) else {
                    return Ok(false);
                };
                let ok = s["connected"] == true
                    && s["running"] == true
                    && s["epoch"] == leader.epoch
                    && s["primary"] == address.as_str();
                last = s;
                Ok(ok)
            })?;
            self.count("other standbys following the promoted one");
            if followed {
                // The promise is no new base; a standby that was itself
                // healing (a flipped byte) may take one legitimately.
                let bytes = last["file_bytes_received"].as_u64().unwrap_or(0);
                if bytes > bytes_before {
                    self.note(format!(
                        "the other standby received {} database bytes while it turned to the promoted one",
                        bytes - bytes_before
                    ));
                } else {
                    self.count("other standbys following with 0 database bytes re-sent");
                }
            }
            if !followed {
                let t = self.standby_log_tail(j);
                self.violation(format!(
                    "liveness: {} did not follow the promoted {} ({address}, epoch {}) within {LONG:?} \
                     (primary {}, epoch {}, connected {}, last_error {}): {t}",
                    self.standbys[j].name,
                    leader.name,
                    leader.epoch,
                    last["primary"],
                    last["epoch"],
                    last["connected"],
                    last["last_error"]
                ));
            }
        }
        self.hold()?;
        self.stop_workload(false)?;
        let history = self.lineage.entries.clone();
        self.promote_into_next_generation(i, history, true)
    }

    /// The old primary restarted on its environment must refuse to serve
    /// (exit 7): etcd holds a newer epoch.
    fn old_primary_refused(&mut self, env: &std::path::Path) -> Result<()> {
        let mut cmd = Command::new(bin("tandem-primary"));
        cmd.args(["run", "--listen", "127.0.0.1:0", "--env"])
            .arg(env)
            .args(self.certs.args("primary"))
            .args(self.primary_etcd_args(false));
        let log = self.logs.join(format!("old-primary-r{}.log", self.round));
        let mut p = Proc::spawn("old tandem-primary", cmd, &log)?;
        let mut code = None;
        let limit = Duration::from_secs(60);
        let started = Instant::now();
        while started.elapsed() < limit {
            self.sample_leaders(false);
            if let Ok(Some(st)) = p.child.try_wait() {
                code = Some(st.code());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.count("old primaries restarted and refused (exit 7)");
        match code {
            Some(Some(7)) => {}
            other => {
                let t = tail(&p.log_text(), 4);
                self.violation(format!(
                    "the old primary, restarted after the failover, did not exit 7 ({other:?}): {t}"
                ));
                let _ = p.kill9();
            }
        }
        Ok(())
    }
}
