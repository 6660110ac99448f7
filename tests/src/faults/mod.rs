//! The fault campaign (issue 11): a primary, one or two standbys and a real
//! BDB workload whose every commit and its log position is logged, with
//! random faults injected round after round and Tandem's promises checked
//! after each round.
//!
//! Promises checked (a broken one is a *violation*; the count must be 0):
//! - a copy of each standby, taken while the standby is frozen, recovers
//!   (`db_recover -c`, then `db_verify`, as promote does) whenever its
//!   status says `recoverable`, to exactly a
//!   prefix of the committed transactions that includes every transaction
//!   the standby ever acknowledged (its durable position against the LSN
//!   log), unless the operator (the driver) explicitly started it over;
//! - no log file is removed from the primary (run with `--retention`) while a
//!   standby still needs it;
//! - a standby whose primary comes back with less log either refuses (exit 3,
//!   directory unchanged) or loses nothing it acknowledged;
//! - a cut or stalled link is visible in status within seconds;
//! - `promote` never leaves the old primary's application committing (two
//!   writable environments); a planned switchover keeps every transaction;
//!   a failover keeps every acknowledged one.
//!
//! [`run`] is called by the `tandem-faults` binary (`scripts/faults`) and by
//! the short run in `tests/tests/faults.rs`. The RNG is seeded: a seed
//! replays the same sequence of faults (timing still varies).

mod auto;
mod check;
mod etcd_mode;
mod etcd_world;
mod history;
mod inject;
mod promote;
mod switchover;
mod tmpfs;
mod world;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;

/// The kinds of fault the campaign injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of a standby, restarted after a while.
    KillStandby,
    /// kill -9 of tandem-primary, restarted after a while (the application
    /// keeps committing).
    KillPrimary,
    /// kill -9 of the application, restarted with recovery.
    KillApp,
    /// The primary's environment replaced by an older copy (power loss with
    /// unsynced log, a restored backup), then tandem-primary restarted.
    Rollback,
    /// The standby's small filesystem filled up, then freed.
    DiskFull,
    /// The link reset and refused for a while.
    LinkCut,
    /// The link silently drops everything for a while (a partition).
    LinkStall,
    /// The link adds latency to every chunk for a while.
    LinkDelay,
    /// The link holds random chunks for a retransmission timeout.
    LinkLossy,
    /// A byte flipped in a mirror database file at rest.
    FlipDb,
    /// A byte flipped in a mirror log file at rest, before the durable end.
    FlipLog,
    /// The primary's machine dies (application and tandem-primary), then a
    /// standby is promoted and becomes the next primary.
    PromoteFailover,
    /// `promote` while the application still commits on a reachable primary
    /// (must be refused without --force).
    PromoteLive,
    /// The application is stopped, then a standby is promoted (switchover).
    PromotePlanned,
    /// `--etcd` only: kill -9 of one etcd member, restarted after a while
    /// (nothing may change: no fence, no failover).
    EtcdMember,
    /// `--etcd` only: two of the three etcd members killed for at least
    /// twice the ttl (no promotion; the primary fences), then restarted.
    EtcdQuorum,
    /// `--etcd` only: the primary cut off from every etcd member until a
    /// standby promotes itself (the primary must fence first and stop its
    /// application), then the links heal and the old primary must exit 7.
    EtcdIsolate,
    /// `--etcd` only: the primary cut off from etcd for a moment well below
    /// the ttl: no failover.
    EtcdBlip,
    /// `--etcd` only: kill -9 of the application and the primary; a standby
    /// must promote itself, the application continues on it, the other
    /// standby follows it, the old primary restarted exits 7.
    AutoFailover,
    /// `--etcd` only: `tandem-standby switchover` to one of the standbys
    /// mid-load (every other time first while the application runs: it
    /// must be refused); the same promises as an automatic failover, and
    /// nothing committed may be lost.
    EtcdSwitchover,
}

impl Fault {
    pub const ALL: [Fault; 14] = [
        Fault::KillStandby,
        Fault::KillPrimary,
        Fault::KillApp,
        Fault::Rollback,
        Fault::DiskFull,
        Fault::LinkCut,
        Fault::LinkStall,
        Fault::LinkDelay,
        Fault::LinkLossy,
        Fault::FlipDb,
        Fault::FlipLog,
        Fault::PromoteFailover,
        Fault::PromoteLive,
        Fault::PromotePlanned,
    ];

    /// What `all` means with `--etcd`: the etcd faults and automatic
    /// failovers, and the kinds that keep their meaning when standbys may
    /// promote themselves. Left out: the operator's `promote` (an operator
    /// does not promote behind etcd's back), a rolled-back primary (its
    /// remedy is such a promote) and the full disk (needs root).
    pub const ETCD_ALL: [Fault; 15] = [
        Fault::KillStandby,
        Fault::KillPrimary,
        Fault::KillApp,
        Fault::LinkCut,
        Fault::LinkStall,
        Fault::LinkDelay,
        Fault::LinkLossy,
        Fault::FlipDb,
        Fault::FlipLog,
        Fault::EtcdMember,
        Fault::EtcdQuorum,
        Fault::EtcdIsolate,
        Fault::EtcdBlip,
        Fault::AutoFailover,
        Fault::EtcdSwitchover,
    ];

    /// Needs the etcd world (`--etcd`).
    pub fn needs_etcd(self) -> bool {
        matches!(
            self,
            Fault::EtcdMember
                | Fault::EtcdQuorum
                | Fault::EtcdIsolate
                | Fault::EtcdBlip
                | Fault::AutoFailover
                | Fault::EtcdSwitchover
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillStandby => "kill-standby",
            Fault::KillPrimary => "kill-primary",
            Fault::KillApp => "kill-app",
            Fault::Rollback => "rollback",
            Fault::DiskFull => "disk-full",
            Fault::LinkCut => "link-cut",
            Fault::LinkStall => "link-stall",
            Fault::LinkDelay => "link-delay",
            Fault::LinkLossy => "link-lossy",
            Fault::FlipDb => "flip-db",
            Fault::FlipLog => "flip-log",
            Fault::PromoteFailover => "promote-failover",
            Fault::PromoteLive => "promote-live",
            Fault::PromotePlanned => "promote-planned",
            Fault::EtcdMember => "etcd-member",
            Fault::EtcdQuorum => "etcd-quorum",
            Fault::EtcdIsolate => "etcd-isolate",
            Fault::EtcdBlip => "etcd-blip",
            Fault::AutoFailover => "auto-failover",
            Fault::EtcdSwitchover => "etcd-switchover",
        }
    }

    /// Parses a comma-separated list of names; "all" means every kind.
    pub fn parse_list(s: &str) -> Result<Vec<Fault>> {
        Fault::parse_list_for(s, false)
    }

    /// Like [`Fault::parse_list`], for the etcd world (`etcd`) or not.
    pub fn parse_list_for(s: &str, etcd: bool) -> Result<Vec<Fault>> {
        let allowed: &[Fault] = if etcd { &Fault::ETCD_ALL } else { &Fault::ALL };
        if s.trim() == "all" {
            return Ok(allowed.to_vec());
        }
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match allowed.iter().find(|f| f.name() == name) {
                Some(f) => out.push(*f),
                None => bail!(
                    "unknown fault {name:?}{}; known: all, {}",
                    if etcd {
                        " with --etcd"
                    } else {
                        " without --etcd"
                    },
                    allowed
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        if out.is_empty() {
            bail!("no fault kinds selected");
        }
        Ok(out)
    }
}

/// What the driver does with a standby that refused a primary whose log no
/// longer continues its own (the operator's two choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDivergence {
    /// Promote the standby that holds the most (it may hold more than the
    /// rolled-back primary).
    Promote,
    /// Restart it with `--start-over` (explicitly discard and follow again).
    StartOver,
}

/// The campaign's settings (the flags of `tandem-faults`).
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub rounds: Option<u64>,
    pub seconds: Option<u64>,
    pub faults: Vec<Fault>,
    pub standbys: usize,
    /// Workload commits per second.
    pub rate: u64,
    pub on_divergence: OnDivergence,
    /// Size of the tmpfs the first standby lives on (for disk-full).
    pub tmpfs_mib: u64,
    /// Most seconds a standby may take to catch up after a round.
    pub settle_secs: u64,
    /// Where to work [default: a new directory under the system temp dir].
    pub work: Option<PathBuf>,
    /// Keep the work directory at the end.
    pub keep: bool,
    /// Run a 3-member etcd and start every daemon with `--etcd`
    /// (automatic failover): the etcd fault kinds and the invariants
    /// "never two leaders" and "no waited commit lost".
    pub etcd: bool,
    /// With `etcd`: the fast test timing (ttl 3 s) or the daemons'
    /// defaults (ttl 10 s).
    pub etcd_default_timing: bool,
    /// Take the kinds in the order given, round after round, instead of
    /// drawing them (the suite's short runs cover each kind that way).
    pub in_order: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: rand::rng().random(),
            rounds: None,
            seconds: None,
            faults: Fault::ALL.to_vec(),
            standbys: 2,
            rate: 100,
            on_divergence: OnDivergence::Promote,
            tmpfs_mib: 256,
            settle_secs: 180,
            work: None,
            keep: false,
            etcd: false,
            etcd_default_timing: false,
            in_order: false,
        }
    }
}

pub const USAGE: &str = "\
usage: tandem-faults [--rounds N] [--seconds S] [--seed X] [--faults LIST]
                     [--standbys 1|2] [--rate COMMITS_PER_SEC]
                     [--on-divergence promote|start-over] [--tmpfs-mib N]
                     [--settle-secs N] [--work DIR] [--keep]
                     [--etcd [--etcd-default-timing]] [--in-order]
Stops after N rounds or S seconds, whichever comes first (default 20 rounds).
LIST is comma-separated fault kinds, or all (default):
  kill-standby kill-primary kill-app rollback disk-full link-cut link-stall
  link-delay link-lossy flip-db flip-log promote-failover promote-live promote-planned
--etcd: a 3-member etcd, every daemon with --etcd (fast timing, ttl 3 s, unless
--etcd-default-timing: ttl 10 s); all then means
  kill-standby kill-primary kill-app link-cut link-stall link-delay link-lossy
  flip-db flip-log etcd-member etcd-quorum etcd-isolate etcd-blip auto-failover
  etcd-switchover
Exit status: 0 no violations, 1 violations or a driver error, 2 bad usage.";

impl Config {
    /// Parses the flags of `tandem-faults` (everything after the program name).
    pub fn from_args(args: &[String]) -> Result<Config> {
        let mut c = Config::default();
        let mut faults: Option<String> = None;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--seed" => c.seed = value()?.parse().context("--seed")?,
                "--rounds" => c.rounds = Some(value()?.parse().context("--rounds")?),
                "--seconds" => c.seconds = Some(value()?.parse().context("--seconds")?),
                "--faults" => faults = Some(value()?),
                "--etcd" => c.etcd = true,
                "--etcd-default-timing" => c.etcd_default_timing = true,
                "--in-order" => c.in_order = true,
                "--standbys" => {
                    c.standbys = value()?.parse().context("--standbys")?;
                    if !(1..=2).contains(&c.standbys) {
                        bail!("--standbys is 1 or 2");
                    }
                }
                "--rate" => c.rate = value()?.parse().context("--rate")?,
                "--on-divergence" => {
                    c.on_divergence = match value()?.as_str() {
                        "promote" => OnDivergence::Promote,
                        "start-over" => OnDivergence::StartOver,
                        other => bail!("--on-divergence is promote or start-over, not {other}"),
                    }
                }
                "--tmpfs-mib" => c.tmpfs_mib = value()?.parse().context("--tmpfs-mib")?,
                "--settle-secs" => c.settle_secs = value()?.parse().context("--settle-secs")?,
                "--work" => c.work = Some(PathBuf::from(value()?)),
                "--keep" => c.keep = true,
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown flag {other}\n{USAGE}"),
            }
        }
        if let Some(list) = &faults {
            c.faults = Fault::parse_list_for(list, c.etcd)?;
        } else if c.etcd {
            c.faults = Fault::ETCD_ALL.to_vec();
        }
        if c.etcd_default_timing && !c.etcd {
            bail!("--etcd-default-timing needs --etcd");
        }
        if c.rounds.is_none() && c.seconds.is_none() {
            c.rounds = Some(20);
        }
        if c.rate == 0 {
            bail!("--rate must be at least 1 (faults are held for a number of commits)");
        }
        Ok(c)
    }

    /// The command that replays this campaign.
    pub fn replay_command(&self) -> String {
        let mut s = format!("scripts/faults --seed {}", self.seed);
        if let Some(r) = self.rounds {
            s += &format!(" --rounds {r}");
        }
        if let Some(secs) = self.seconds {
            s += &format!(" --seconds {secs}");
        }
        if self.etcd {
            s += " --etcd";
            if self.etcd_default_timing {
                s += " --etcd-default-timing";
            }
        }
        let all: &[Fault] = if self.etcd {
            &Fault::ETCD_ALL
        } else {
            &Fault::ALL
        };
        if self.faults != all {
            s += &format!(
                " --faults {}",
                self.faults
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        if self.in_order {
            s += " --in-order";
        }
        s += &format!(" --standbys {} --rate {}", self.standbys, self.rate);
        if self.tmpfs_mib != Config::default().tmpfs_mib {
            s += &format!(" --tmpfs-mib {}", self.tmpfs_mib);
        }
        if self.on_divergence == OnDivergence::StartOver {
            s += " --on-divergence start-over";
        }
        s
    }
}

/// One broken promise.
#[derive(Debug, Clone)]
pub struct Violation {
    pub round: u64,
    /// The round's fault and its details (which standby, which byte, ...).
    pub fault: String,
    pub what: String,
}

/// What a campaign did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub rounds: u64,
    pub elapsed: Duration,
    pub generations: u32,
    pub faults: BTreeMap<&'static str, u64>,
    pub checks: BTreeMap<&'static str, u64>,
    pub violations: Vec<Violation>,
    /// Automatic failovers: kill -9 (or the isolation) to the first
    /// transaction committed on the promoted primary.
    pub failover_times: Vec<Duration>,
    /// The lease ttl of the etcd world (None without --etcd).
    pub ttl: Option<Duration>,
    /// Things worth knowing that break no promise (a standby restarted
    /// after it exited on a full disk, a flag this build lacks, ...).
    pub notes: Vec<String>,
    /// Set when the driver itself failed and stopped the campaign early.
    pub error: Option<String>,
    pub replay: String,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes Ctrl-C / SIGTERM end the campaign after the current round, so the
/// tmpfs is unmounted and the processes are stopped.
pub fn stop_on_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Runs the campaign and returns its report (violations are in the report,
/// not errors; an error means the driver could not set up at all).
pub fn run(cfg: Config) -> Result<Report> {
    let started = Instant::now();
    let mut w = world::World::new(cfg.clone())?;
    eprintln!(
        "faults: seed {} in {} (replay: {})",
        cfg.seed,
        w.root.display(),
        cfg.replay_command()
    );
    let kinds: Vec<Fault> = cfg
        .faults
        .iter()
        .copied()
        .filter(|f| *f != Fault::DiskFull || w.has_tmpfs())
        .collect();
    if kinds.len() < cfg.faults.len() {
        w.note("disk-full skipped: no tmpfs could be mounted (needs root)".into());
    }
    let mut error = None;
    if kinds.is_empty() {
        error = Some("no fault kind can run here".to_string());
    }
    while error.is_none() {
        let out_of_rounds = cfg.rounds.is_some_and(|r| w.round >= r);
        let out_of_time = cfg
            .seconds
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s));
        if out_of_rounds || out_of_time || INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        w.round += 1;
        let fault = if cfg.in_order {
            kinds[(w.round as usize - 1) % kinds.len()]
        } else {
            kinds[w.rng.random_range(0..kinds.len())]
        };
        *w.tally.faults.entry(fault.name()).or_default() += 1;
        let before = w.tally.violations.len();
        let round = (|| -> Result<()> {
            w.inject(fault)?;
            w.settle()?;
            w.check_invariants()
        })();
        if let Err(e) = round {
            error = Some(format!("round {} ({}): {e:#}", w.round, w.fault));
        }
        eprintln!(
            "faults: round {} {} [{:.0}s, unix {} ms] {}",
            w.round,
            w.fault,
            started.elapsed().as_secs_f64(),
            tandem_shared::now_unix_ms(),
            match w.tally.violations.len() - before {
                0 => "ok".to_string(),
                n => format!("{n} VIOLATION(S)"),
            }
        );
    }
    let report = Report {
        seed: cfg.seed,
        rounds: w.round,
        elapsed: started.elapsed(),
        generations: w.gen,
        faults: std::mem::take(&mut w.tally.faults),
        checks: std::mem::take(&mut w.tally.checks),
        violations: std::mem::take(&mut w.tally.violations),
        failover_times: w
            .etcd
            .as_ref()
            .map(|e| e.failover_times.clone())
            .unwrap_or_default(),
        ttl: w.etcd.as_ref().map(|e| e.timing.ttl),
        notes: std::mem::take(&mut w.tally.notes),
        error,
        replay: cfg.replay_command(),
    };
    if report.error.is_some() || !report.violations.is_empty() {
        w.keep_on_exit();
    }
    drop(w);
    Ok(report)
}

/// The table printed at the end of a campaign.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "fault campaign: {} rounds in {:.0} s, {} generation(s), seed {}\n",
        r.rounds,
        r.elapsed.as_secs_f64(),
        r.generations,
        r.seed
    );
    s += "  faults injected\n";
    for (k, n) in &r.faults {
        s += &format!("    {k:<52} {n:>6}\n");
    }
    s += "  invariant checks\n";
    for (k, n) in &r.checks {
        s += &format!("    {k:<52} {n:>6}\n");
    }
    if !r.failover_times.is_empty() {
        let mut t = r.failover_times.clone();
        t.sort();
        s += &format!(
            "  automatic failovers, kill -9 to the first commit on the new primary (ttl {:?}): {} runs, median {:.2} s, max {:.2} s, min {:.2} s\n",
            r.ttl.unwrap_or_default(),
            t.len(),
            t[t.len() / 2].as_secs_f64(),
            t[t.len() - 1].as_secs_f64(),
            t[0].as_secs_f64()
        );
    }
    s += &format!("  violations {:>48}\n", r.violations.len());
    for v in &r.violations {
        s += &format!("    round {} [{}]: {}\n", v.round, v.fault, v.what);
    }
    if !r.notes.is_empty() {
        s += &format!("  notes              {:>6}\n", r.notes.len());
        let mut counted: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &r.notes {
            *counted.entry(n.as_str()).or_default() += 1;
        }
        for (n, c) in counted {
            s += &format!("    {c}x {n}\n");
        }
    }
    if let Some(e) = &r.error {
        s += &format!("  DRIVER ERROR (campaign stopped early): {e}\n");
    }
    s += &format!("  replay: {}\n", r.replay);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_replay() {
        let args: Vec<String> = [
            "--seed",
            "7",
            "--faults",
            "kill-app,rollback",
            "--standbys",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = Config::from_args(&args).unwrap();
        assert_eq!(c.seed, 7);
        assert_eq!(c.rounds, Some(20));
        assert_eq!(c.faults, vec![Fault::KillApp, Fault::Rollback]);
        let replay = c.replay_command();
        assert!(replay.contains("--seed 7") && replay.contains("--faults kill-app,rollback"));
        assert!(Config::from_args(&["--faults".into(), "nope".into()]).is_err());
        assert!(Config::from_args(&["--standbys".into(), "3".into()]).is_err());
        assert_eq!(Fault::parse_list("all").unwrap().len(), Fault::ALL.len());
    }
}
