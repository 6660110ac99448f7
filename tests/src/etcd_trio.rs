//! The etcd world of the switchover tests: a primary (`p1`) and two
//! standbys (`s1`, `s2`) under `--etcd` with the fast timing, caught up and
//! publishing; the `tandem-standby switchover` command; and the test
//! hooks' pause points (`tandem_coord::test_hook`).

use crate::bdb;
use crate::etcd::{EtcdCluster, FAST_TIMING};
use crate::harness::*;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

pub const STANDBYS: [&str; 2] = ["s1", "s2"];

pub struct Trio {
    pub s: Scratch,
    pub primary: Primary,
    pub standbys: Vec<Proc>,
    /// Where standby i serves once promoted.
    pub listens: Vec<String>,
    /// Where the pause points of the test hooks meet the test.
    pub hooks: PathBuf,
}

impl Trio {
    /// Starts the trio; `pause[i]` arms test hooks in standby i
    /// (`TANDEM_TEST_PAUSE_AT`, empty: none).
    pub fn start(etcd: &EtcdCluster, pause: [&str; 2]) -> Result<Self> {
        let s = Scratch::new()?;
        let env = s.path("env");
        let hooks = s.path("hooks");
        std::fs::create_dir_all(&hooks)?;
        bdb::run_workload(&env, &workload(300, 100))?;
        let mut pargs = vec![
            "--etcd".to_owned(),
            etcd.endpoints(),
            "--name".into(),
            "p1".into(),
        ];
        pargs.extend(FAST_TIMING.map(String::from));
        let p: Vec<&str> = pargs.iter().map(String::as_str).collect();
        let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &p)?;
        let mut t = Self {
            s,
            primary,
            standbys: Vec::new(),
            listens: Vec::new(),
            hooks,
        };
        for (i, pause) in pause.iter().enumerate() {
            t.listens.push(free_addr()?);
            let proc = t.start_standby(etcd, i, pause)?;
            t.standbys.push(proc);
        }
        for (i, name) in STANDBYS.iter().enumerate() {
            wait_caught_up_running(&t.s.path(name), &env, LONG, &mut t.standbys[i])?;
        }
        wait_for("both standbys published", LONG, || {
            Ok(etcd.get("/tandem/c1/members/s1")?.is_some()
                && etcd.get("/tandem/c1/members/s2")?.is_some())
        })?;
        Ok(t)
    }

    /// `tandem-standby run --etcd` of standby i (again, after a kill),
    /// with the pause points `pause` armed (empty: none).
    pub fn start_standby(&self, etcd: &EtcdCluster, i: usize, pause: &str) -> Result<Proc> {
        self.start_standby_named(etcd, i, STANDBYS[i], pause)
    }

    /// [`Trio::start_standby`] under another `--name`.
    pub fn start_standby_named(
        &self,
        etcd: &EtcdCluster,
        i: usize,
        name: &str,
        pause: &str,
    ) -> Result<Proc> {
        let mut args = vec![
            "--etcd".to_owned(),
            etcd.endpoints(),
            "--promote-listen".into(),
            self.listens[i].clone(),
            "--check-interval-secs".into(),
            "0".into(),
        ];
        args.extend(FAST_TIMING.map(String::from));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs = [
            ("TANDEM_TEST_PAUSE_AT", pause.to_owned()),
            ("TANDEM_TEST_PAUSE_DIR", self.hooks.display().to_string()),
        ];
        start_standby_env(
            self.s.root(),
            &self.s.path(STANDBYS[i]),
            &self.primary.url(),
            &self.s.certs,
            name,
            &a,
            &envs,
        )
    }

    /// Waits until a daemon paused at `point`.
    pub fn wait_paused(&mut self, point: &str) -> Result<()> {
        let f = self.hooks.join(format!("{point}.paused"));
        wait_for(&format!("a pause at {point}"), LONG, || Ok(f.exists()))
    }

    /// Lets the daemon paused at `point` go on.
    pub fn resume(&self, point: &str) -> Result<()> {
        std::fs::write(self.hooks.join(format!("{point}.resume")), b"")?;
        Ok(())
    }

    /// Asks each of the possible primaries, every 100 ms, whether it acts.
    pub fn sampler(&self) -> Result<crate::etcd::LeaderSampler> {
        let p = |f: &str| self.s.certs.dir.join(f);
        let tls = tandem_shared::tls::TlsFiles {
            cert: p("standby.pem"),
            key: p("standby-key.pem"),
            ca: p("ca.pem"),
        };
        let mut urls = vec![self.primary.url()];
        urls.extend(self.listens.iter().map(|l| format!("https://{l}")));
        crate::etcd::LeaderSampler::start(urls, tls)
    }

    /// The switchover command in the background, its output in `log`.
    pub fn spawn_switchover(&self, etcd: &EtcdCluster, extra: &[&str], log: &str) -> Result<Proc> {
        Proc::spawn(
            "switchover",
            switchover_command(&etcd.endpoints(), extra),
            &self.s.path(log),
        )
    }

    /// Waits until standby `name` (its process `proc`) follows the
    /// primary etcd names at `epoch`, caught up; Err if it re-copied any
    /// database byte.
    pub fn wait_follows(
        &self,
        i: usize,
        proc: &mut Proc,
        etcd: &EtcdCluster,
        epoch: u64,
    ) -> Result<()> {
        let dir = self.s.path(STANDBYS[i]);
        let base = standby_status(&dir)?["base_id"].clone();
        wait_while_running("the standby to follow the new primary", LONG, proc, || {
            let leader = etcd.get_json("/tandem/c1/leader")?.context("leader")?;
            let st = standby_status(&dir)?;
            Ok(st["connected"] == true
                && st["primary"] == leader["address"]
                && st["epoch"] == epoch
                && st["lag_bytes"] == 0)
        })?;
        let st = standby_status(&dir)?;
        anyhow::ensure!(
            st["base_id"] == base && st["file_bytes_received"] == 0,
            "the standby re-copied its base: {st}"
        );
        Ok(())
    }
}

/// `tandem-standby switchover --etcd ENDPOINTS --cluster c1 EXTRA...`.
pub fn switchover_command(endpoints: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("tandem-standby"));
    cmd.args(["switchover", "--etcd", endpoints, "--cluster", "c1"])
        .args(extra);
    cmd
}

/// Runs the switchover command to its end: exit code and output.
pub fn switchover(endpoints: &str, extra: &[&str]) -> Result<(Option<i32>, String)> {
    let out = switchover_command(endpoints, extra).output()?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}
