//! `tandem-standby verify-archive` and `tandem-standby restore`: prove a
//! backup written by [`crate::archive`] is intact and recovers, and turn it
//! into an environment applications open, optionally as of a past time.
//!
//! Both start by checking every file against the manifest (missing, extra,
//! resized, altered files and a manifest whose digest does not match are
//! each named) and walking the log as one verified record chain. Restore
//! writes nothing until all of that passed and the requested time is known
//! to lie inside the backup's window; then it copies the backup beside the
//! target, runs catastrophic recovery and `db_verify` there, and renames
//! the recovered environment into place, so the target appears complete or
//! not at all.
//!
//! Point in time. `db_recover -t` keeps exactly the transactions whose
//! commit record's timestamp (whole seconds, the primary's clock) is at or
//! before the given time and rolls back the rest; it reads the time in the
//! local time zone of its process, so Tandem passes UTC and runs it with
//! `TZ=UTC0`. The window a backup can restore to starts at the later of
//! its first commit (transactions committed before the backup's first log
//! file are part of its database files and cannot be undone) and BDB's own
//! limit, the first checkpoint whose ckp_lsn is at or after the first log
//! record (earlier times fail with BDB1509; without such a checkpoint `-t`
//! fails with DB_NOTFOUND). It ends at the last commit in the backup: what
//! was committed after that is unknown to the backup.

use crate::archive::{
    check_files, copy_backup, fsync_tree, list_backups, lock_archive, log_rel_name, read_manifest,
    rfc3339, scan_logs, ArchiveError, LogSummary, Manifest, Problem, PUBLISH_LOCK,
};
use serde::Serialize;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tandem_shared::bdb::{parse_last_valid_lsn, BdbError, BdbTools};
use tandem_shared::durable::fsync_dir;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::logfile::parse_log_file_name;
use tandem_shared::LogPosition;

/// Provenance written into a restored environment (hidden: BDB and Tandem
/// ignore it).
pub const RESTORE_INFO_FILE: &str = ".tandem-restore.json";
/// Recovery gets a bigger cache (BDB.md §5: it halved the replay time) when
/// DB_CONFIG sets none; a restored environment gets the backup's DB_CONFIG
/// back, byte for byte, before it is renamed into place.
const SCRATCH_CACHE: &str = "set_cachesize 0 268435456 1";

// ---------------------------------------------------------------- times

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zone {
    Utc,
    /// Seconds east of UTC.
    Offset(i64),
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fields {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

const FORMS: &str = "expected @UNIXSECONDS, YYYY-MM-DDTHH:MM:SS[.frac][Z|±HH:MM], \"YYYY-MM-DD HH:MM:SS\" or BDB's [[CC]YY]MMDDhhmm[.SS]";

/// Parses a restore time into unix seconds. Accepted:
/// - `@1795636648`: unix seconds;
/// - RFC 3339, `2026-11-25T19:57:28Z` or with an offset `+02:00`;
/// - `2026-11-25 19:57:28` or `2026-11-25T19:57:28` without a zone: local
///   time (UTC on a host set to UTC);
/// - BDB's `[[CC]YY]MMDDhhmm[.SS]`, local time, as `db_recover -t` reads it
///   (without CC: YY 69..99 is 19YY, otherwise 20YY; without YY: this year).
///
/// Fractions of a second are dropped: BDB stamps commits in whole seconds.
pub fn parse_time(input: &str) -> Result<i64, ArchiveError> {
    let s = input.trim();
    let bad = |why: String| ArchiveError::BadTime {
        input: input.to_owned(),
        why,
    };
    let unix = if let Some(digits) = s.strip_prefix('@') {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("{digits:?} is not a number of seconds")));
        }
        digits.parse::<i64>().map_err(|e| bad(e.to_string()))?
    } else {
        let (fields, zone) = if s.contains('-') || s.contains(':') {
            parse_iso(s)
        } else {
            parse_bdb(s, current_local_year())
        }
        .map_err(bad)?;
        validate(&fields).map_err(bad)?;
        to_unix(&fields, zone).map_err(bad)?
    };
    if !(0..=i64::from(i32::MAX)).contains(&unix) {
        return Err(bad(
            "outside the range of BDB's commit timestamps (1970 .. 2038)".into(),
        ));
    }
    Ok(unix)
}

fn digits_at(s: &str, r: std::ops::Range<usize>) -> Result<u32, String> {
    let part = s.get(r).ok_or_else(|| FORMS.to_owned())?;
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FORMS.to_owned());
    }
    part.parse().map_err(|_| FORMS.to_owned())
}

fn parse_iso(s: &str) -> Result<(Fields, Zone), String> {
    let b = s.as_bytes();
    if b.len() < 16
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
    {
        return Err(FORMS.to_owned());
    }
    let mut f = Fields {
        year: i64::from(digits_at(s, 0..4)?),
        month: digits_at(s, 5..7)?,
        day: digits_at(s, 8..10)?,
        hour: digits_at(s, 11..13)?,
        minute: digits_at(s, 14..16)?,
        second: 0,
    };
    let mut i = 16;
    if b.get(i) == Some(&b':') {
        f.second = digits_at(s, i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return Err(FORMS.to_owned());
            }
        }
    }
    let zone = match &s[i..] {
        "" => Zone::Local,
        "Z" | "z" => Zone::Utc,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let rest = &z[1..];
            let (h, m) = match rest.len() {
                5 if rest.as_bytes()[2] == b':' => (digits_at(rest, 0..2)?, digits_at(rest, 3..5)?),
                4 => (digits_at(rest, 0..2)?, digits_at(rest, 2..4)?),
                2 => (digits_at(rest, 0..2)?, 0),
                _ => return Err(format!("bad zone offset {z:?}")),
            };
            if h > 23 || m > 59 {
                return Err(format!("bad zone offset {z:?}"));
            }
            Zone::Offset(sign * i64::from(h * 3600 + m * 60))
        }
        z => return Err(format!("unexpected {z:?} after the time; {FORMS}")),
    };
    Ok((f, zone))
}

fn parse_bdb(s: &str, this_year: i64) -> Result<(Fields, Zone), String> {
    let (main, secs) = match s.split_once('.') {
        Some((m, sec)) => (m, Some(sec)),
        None => (s, None),
    };
    if !main.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FORMS.to_owned());
    }
    let (year, rest) = match main.len() {
        12 => (i64::from(digits_at(main, 0..4)?), &main[4..]),
        10 => {
            let yy = i64::from(digits_at(main, 0..2)?);
            (if yy >= 69 { 1900 + yy } else { 2000 + yy }, &main[2..])
        }
        8 => (this_year, main),
        _ => {
            return Err(format!(
                "BDB's form has 8, 10 or 12 digits before the optional .SS; {FORMS}"
            ))
        }
    };
    let second = match secs {
        None => 0,
        Some(sec) if sec.len() == 2 => digits_at(sec, 0..2)?,
        Some(_) => return Err("seconds after '.' must be two digits".into()),
    };
    Ok((
        Fields {
            year,
            month: digits_at(rest, 0..2)?,
            day: digits_at(rest, 2..4)?,
            hour: digits_at(rest, 4..6)?,
            minute: digits_at(rest, 6..8)?,
            second,
        },
        Zone::Local,
    ))
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn validate(f: &Fields) -> Result<(), String> {
    if !(1..=12).contains(&f.month) {
        return Err(format!("month {} is not 1..12", f.month));
    }
    if f.day == 0 || f.day > days_in_month(f.year, f.month) {
        return Err(format!(
            "day {} does not exist in {}-{:02}",
            f.day, f.year, f.month
        ));
    }
    if f.hour > 23 || f.minute > 59 || f.second > 59 {
        return Err(format!(
            "{:02}:{:02}:{:02} is not a time of day",
            f.hour, f.minute, f.second
        ));
    }
    Ok(())
}

fn to_unix(f: &Fields, zone: Zone) -> Result<i64, String> {
    let utc = crate::archive::days_from_civil(f.year, f.month, f.day) * 86_400
        + i64::from(f.hour * 3600 + f.minute * 60 + f.second);
    match zone {
        Zone::Utc => Ok(utc),
        Zone::Offset(east) => Ok(utc - east),
        Zone::Local => {
            // SAFETY: tm is plain data; mktime reads and normalises it.
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            tm.tm_year = (f.year - 1900) as i32;
            tm.tm_mon = f.month as i32 - 1;
            tm.tm_mday = f.day as i32;
            tm.tm_hour = f.hour as i32;
            tm.tm_min = f.minute as i32;
            tm.tm_sec = f.second as i32;
            tm.tm_isdst = -1;
            // SAFETY: a valid tm.
            let t = unsafe { libc::mktime(&mut tm) };
            if t == -1 {
                return Err("not a valid local time".into());
            }
            Ok(t as i64)
        }
    }
}

fn current_local_year() -> i64 {
    // SAFETY: time and localtime_r with valid pointers.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 1970;
        }
        i64::from(tm.tm_year) + 1900
    }
}

// ---------------------------------------------------------------- scratch

/// A directory removed when dropped.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    fn new(parent: Option<&Path>, tag: &str) -> Result<Self, ArchiveError> {
        let parent = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&parent).map_err(crate::archive::io_err(format!(
            "creating {}",
            parent.display()
        )))?;
        for i in 0..100u32 {
            let path = parent.join(format!(
                "tandem-{tag}-{}-{}-{i}",
                std::process::id(),
                tandem_shared::now_unix_ms()
            ));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(crate::archive::io_err(format!(
                        "creating {}",
                        path.display()
                    ))(e))
                }
            }
        }
        Err(ArchiveError::Check(format!(
            "cannot create a scratch directory in {}",
            parent.display()
        )))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// What a recovery proof found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Proof {
    pub seconds: f64,
    pub recovery_seconds: f64,
    pub recovered_to: Option<LogPosition>,
    pub databases_verified: usize,
}

/// Copies a backup to a scratch directory, runs catastrophic recovery and
/// `db_verify` there, and removes the scratch copy. The caller makes sure
/// the backup does not change meanwhile.
pub fn prove_recovers(
    backup: &Path,
    m: &Manifest,
    scratch: Option<&Path>,
) -> Result<Proof, ArchiveError> {
    let started = Instant::now();
    let dir = ScratchDir::new(scratch, "verify")?;
    copy_backup(backup, m, &dir.path)?;
    let mut proof = recover_scratch(&dir.path, m)?;
    proof.seconds = started.elapsed().as_secs_f64();
    Ok(proof)
}

/// Gives recovery in `home` a bigger cache unless DB_CONFIG sets one.
/// Returns the original DB_CONFIG (None: there was none), for
/// [`restore_config`].
fn boost_cache(home: &Path) -> Result<Option<Vec<u8>>, ArchiveError> {
    let cfg = home.join(DB_CONFIG);
    let original = match fs::read(&cfg) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(crate::archive::io_err(format!("reading {}", cfg.display()))(e)),
    };
    let mut config = String::from_utf8_lossy(original.as_deref().unwrap_or_default()).into_owned();
    if !config.contains("set_cachesize") {
        config.push_str(&format!("\n{SCRATCH_CACHE}\n"));
        fs::write(&cfg, config)
            .map_err(crate::archive::io_err(format!("writing {}", cfg.display())))?;
    }
    Ok(original)
}

/// Puts DB_CONFIG back exactly as the backup had it.
fn restore_config(home: &Path, original: Option<Vec<u8>>) -> Result<(), ArchiveError> {
    let cfg = home.join(DB_CONFIG);
    match original {
        Some(bytes) => fs::write(&cfg, bytes),
        None => fs::remove_file(&cfg),
    }
    .map_err(crate::archive::io_err(format!(
        "restoring {}",
        cfg.display()
    )))
}

fn recover_scratch(home: &Path, m: &Manifest) -> Result<Proof, ArchiveError> {
    boost_cache(home)?;
    let rec = run_recover(home, None)?;
    let verified = verify_databases(home, m)?;
    Ok(Proof {
        recovery_seconds: rec.seconds,
        recovered_to: rec.recovered_to,
        databases_verified: verified,
        ..Default::default()
    })
}

struct Recovered {
    seconds: f64,
    recovered_to: Option<LogPosition>,
}

/// `db_recover -c -v [-t UTC time] -h home`, with `TZ=UTC0` so `-t` means
/// UTC whatever the host's zone.
fn run_recover(home: &Path, until: Option<i64>) -> Result<Recovered, ArchiveError> {
    let started = Instant::now();
    let tool = BdbTools::default().tool("recover");
    let mut cmd = Command::new(&tool);
    cmd.env("TZ", "UTC0").args(["-c", "-v"]);
    if let Some(t) = until {
        cmd.arg("-t").arg(crate::archive::bdb_time_utc(t));
    }
    cmd.arg("-h").arg(home);
    let what = match until {
        Some(t) => format!("catastrophic recovery to {}", rfc3339(t)),
        None => "catastrophic recovery".to_owned(),
    };
    let out = cmd.output().map_err(|source| ArchiveError::Bdb {
        what: what.clone(),
        source: BdbError::Spawn {
            tool: tool.clone(),
            source,
        },
    })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(ArchiveError::Bdb {
            what,
            source: BdbError::Failed {
                tool,
                status: out.status.to_string(),
                stderr: text.trim().to_owned(),
            },
        });
    }
    Ok(Recovered {
        seconds: started.elapsed().as_secs_f64(),
        recovered_to: parse_last_valid_lsn(&text),
    })
}

fn verify_databases(home: &Path, m: &Manifest) -> Result<usize, ArchiveError> {
    let tools = BdbTools::default();
    let mut n = 0;
    for f in m.databases() {
        tools
            .verify(home, &f.name)
            .map_err(|source| ArchiveError::Bdb {
                what: format!("db_verify of {}", f.name),
                source,
            })?;
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------- verify

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backup: String,
    pub ok: bool,
    pub env_id: String,
    pub base_id: String,
    pub files: usize,
    pub bytes: u64,
    pub log_start: LogPosition,
    pub log_end: LogPosition,
    pub commits: u64,
    pub first_commit: Option<String>,
    pub last_commit: Option<String>,
    pub earliest_restore: Option<String>,
    /// Each file that is missing, extra, resized or altered.
    pub problems: Vec<Problem>,
    pub recovered_to: Option<LogPosition>,
    pub recovery_seconds: f64,
    pub databases_verified: usize,
    pub seconds: f64,
    pub error: Option<String>,
}

/// The backups `target` names: itself if it holds a manifest, otherwise
/// the newest backup in it (all of them with `all`).
pub fn resolve_backups(target: &Path, all: bool) -> Result<Vec<PathBuf>, ArchiveError> {
    if fs::symlink_metadata(target.join(crate::archive::MANIFEST_FILE)).is_ok() {
        return Ok(vec![target.to_path_buf()]);
    }
    if !target.is_dir() {
        return Err(crate::archive::io_err(format!(
            "opening {}",
            target.display()
        ))(io::Error::from(io::ErrorKind::NotFound)));
    }
    let mut backups: Vec<PathBuf> = list_backups(target)?.into_iter().map(|b| b.path).collect();
    if backups.is_empty() {
        return Err(ArchiveError::NoBackups(target.to_path_buf()));
    }
    if !all {
        backups = backups.split_off(backups.len() - 1);
    }
    Ok(backups)
}

fn archive_of(backup: &Path) -> PathBuf {
    backup
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Checks one backup: manifest, every file's blake3, the log chain, then
/// recovery and `db_verify` on a scratch copy.
pub fn verify_backup(backup: &Path, scratch: Option<&Path>) -> VerifyReport {
    let started = Instant::now();
    let mut r = VerifyReport {
        backup: backup.display().to_string(),
        ..Default::default()
    };
    match verify_inner(backup, scratch, &mut r) {
        Ok(()) => r.ok = true,
        Err(e) => {
            if let ArchiveError::Integrity { problems, .. } = &e {
                r.problems = problems.clone();
            }
            r.error = Some(e.to_string());
        }
    }
    r.seconds = started.elapsed().as_secs_f64();
    r
}

fn verify_inner(
    backup: &Path,
    scratch: Option<&Path>,
    r: &mut VerifyReport,
) -> Result<(), ArchiveError> {
    let lock = lock_archive(&archive_of(backup), PUBLISH_LOCK, false, false)?;
    let m = read_manifest(backup)?;
    r.env_id = m.env_id.clone();
    r.base_id = m.base_id.clone();
    r.files = m.files.len();
    r.log_start = m.log_start;
    r.log_end = m.log_end;
    r.commits = m.commits;
    r.first_commit = m.first_commit_unix.map(rfc3339);
    r.last_commit = m.last_commit_unix.map(rfc3339);
    r.earliest_restore = m.earliest_restore_unix().map(rfc3339);
    let summary = check_backup(backup, &m)?;
    r.bytes = m.files.iter().map(|f| f.size).sum();
    if summary.commits != m.commits
        || summary.first_commit_unix != m.first_commit_unix
        || summary.last_commit_unix != m.last_commit_unix
    {
        return Err(ArchiveError::Check(format!(
            "{}: the manifest's commit count or times do not match its log ({} commits {:?}..{:?} in the log)",
            backup.display(),
            summary.commits,
            summary.first_commit_unix,
            summary.last_commit_unix
        )));
    }
    let started = Instant::now();
    let dir = ScratchDir::new(scratch, "verify")?;
    copy_backup(backup, &m, &dir.path)?;
    drop(lock);
    let proof = recover_scratch(&dir.path, &m)?;
    r.recovered_to = proof.recovered_to;
    r.recovery_seconds = proof.recovery_seconds;
    r.databases_verified = proof.databases_verified;
    tracing::info!(backup = %backup.display(), secs = started.elapsed().as_secs_f64(), "backup verified");
    Ok(())
}

/// Every file against the manifest, then the log as one verified chain
/// that ends where the manifest says. Writes nothing.
fn check_backup(backup: &Path, m: &Manifest) -> Result<LogSummary, ArchiveError> {
    let (problems, _) = check_files(backup, m)?;
    if !problems.is_empty() {
        return Err(ArchiveError::Integrity {
            backup: backup.to_path_buf(),
            problems,
        });
    }
    scan_logs(
        &backup.join(&m.log_dir),
        m.log_start.file,
        m.log_end.file,
        Some(m.log_end.offset),
        None,
    )
}

// ---------------------------------------------------------------- restore

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub from: PathBuf,
    pub to: PathBuf,
    /// As given on the command line (see [`parse_time`]).
    pub until: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    pub backup: String,
    pub target: String,
    pub env_id: String,
    pub base_id: String,
    pub until: Option<String>,
    pub until_unix: Option<i64>,
    /// What `-t` was given (UTC, run with TZ=UTC0).
    pub until_bdb: Option<String>,
    pub window_from: Option<String>,
    pub window_to: Option<String>,
    pub log_end: LogPosition,
    pub recovered_to: Option<LogPosition>,
    /// The newest commit left in the restored log (with --until).
    pub last_commit_kept: Option<String>,
    pub files: usize,
    pub bytes: u64,
    pub recovery_seconds: f64,
    pub databases_verified: usize,
    pub seconds: f64,
}

/// Refuses a target that exists and is not an empty directory.
fn ensure_empty_target(to: &Path) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::archive::io_err(format!("reading {}", to.display()))(
            e,
        )),
        Ok(md) if md.is_dir() => {
            let mut entries = fs::read_dir(to)
                .map_err(crate::archive::io_err(format!("reading {}", to.display())))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(ArchiveError::TargetNotEmpty(to.to_path_buf()))
            }
        }
        Ok(_) => Err(ArchiveError::TargetNotEmpty(to.to_path_buf())),
    }
}

fn window_of(m_first: Option<i64>, m_ckp: Option<i64>, m_last: Option<i64>) -> Option<(i64, i64)> {
    Some((crate::archive::window_start(m_first, m_ckp)?, m_last?))
}

/// The backup to restore from: `from` itself, or the newest backup in it
/// (with a time: the newest whose window holds it).
fn choose_backup(from: &Path, until: Option<i64>) -> Result<PathBuf, ArchiveError> {
    if fs::symlink_metadata(from.join(crate::archive::MANIFEST_FILE)).is_ok() {
        return Ok(from.to_path_buf());
    }
    let backups = resolve_backups(from, true)?;
    let mut windows = Vec::new();
    for b in backups.iter().rev() {
        let m = match read_manifest(b) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "skipping a backup whose manifest is unreadable");
                continue;
            }
        };
        let Some(t) = until else { return Ok(b.clone()) };
        if let Some((lo, hi)) = window_of(
            m.first_commit_unix,
            m.earliest_checkpoint_unix,
            m.last_commit_unix,
        ) {
            if (lo..=hi).contains(&t) {
                return Ok(b.clone());
            }
            windows.push((lo, hi));
        }
    }
    match until {
        None => Err(ArchiveError::NoBackups(from.to_path_buf())),
        Some(t) => Err(ArchiveError::OutsideWindow {
            backup: from.display().to_string(),
            requested: rfc3339(t),
            from: windows
                .iter()
                .map(|w| w.0)
                .min()
                .map(rfc3339)
                .unwrap_or_else(|| "-".into()),
            to: windows
                .iter()
                .map(|w| w.1)
                .max()
                .map(rfc3339)
                .unwrap_or_else(|| "-".into()),
            why: "no backup in the archive covers that time".into(),
        }),
    }
}

/// Is `t` a time this backup's log can restore to?
pub fn check_window(t: i64, s: &LogSummary, backup: &Path) -> Result<(i64, i64), ArchiveError> {
    let name = backup.display().to_string();
    let (Some(first), Some(last)) = (s.first_commit_unix, s.last_commit_unix) else {
        return Err(ArchiveError::NoPointInTime {
            backup: name,
            why: "its log holds no committed transaction".into(),
        });
    };
    let Some(ckp) = s.earliest_checkpoint_unix else {
        return Err(ArchiveError::NoPointInTime {
            backup: name,
            why: "its log holds no checkpoint at or after its first record, which db_recover -t needs (it fails with DB_NOTFOUND)".into(),
        });
    };
    let from = first.max(ckp);
    let outside = |why: &str| ArchiveError::OutsideWindow {
        backup: name.clone(),
        requested: format!("{} (@{t})", rfc3339(t)),
        from: rfc3339(from),
        to: rfc3339(last),
        why: why.into(),
    };
    if t < first {
        return Err(outside("it is before the first commit in the backup; older transactions are part of its database files and cannot be undone"));
    }
    if t < ckp {
        return Err(outside("it is before the backup's first checkpoint, the earliest time db_recover -t accepts (BDB1509)"));
    }
    if t > last {
        return Err(outside("it is after the last commit in the backup, which cannot tell what was committed after that"));
    }
    Ok((from, last))
}

/// Restores a backup into a new environment home.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, ArchiveError> {
    let started = Instant::now();
    let until = opts.until.as_deref().map(parse_time).transpose()?;
    ensure_empty_target(&opts.to)?;
    let backup = choose_backup(&opts.from, until)?;
    let lock = lock_archive(&archive_of(&backup), PUBLISH_LOCK, false, false)?;
    let m = read_manifest(&backup)?;
    let summary = check_backup(&backup, &m)?;
    let mut report = RestoreReport {
        backup: backup.display().to_string(),
        target: opts.to.display().to_string(),
        env_id: m.env_id.clone(),
        base_id: m.base_id.clone(),
        until: until.map(rfc3339),
        until_unix: until,
        until_bdb: until.map(crate::archive::bdb_time_utc),
        log_end: m.log_end,
        files: m.files.len(),
        bytes: m.files.iter().map(|f| f.size).sum(),
        ..Default::default()
    };
    if let Some(t) = until {
        let (from, to) = check_window(t, &summary, &backup)?;
        report.window_from = Some(rfc3339(from));
        report.window_to = Some(rfc3339(to));
    }
    // Everything checked: now write, beside the target, under a temp name.
    ensure_empty_target(&opts.to)?;
    let name = opts
        .to
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            ArchiveError::Check(format!("{} has no usable file name", opts.to.display()))
        })?;
    let parent = match opts.to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(crate::archive::io_err(format!(
        "creating {}",
        parent.display()
    )))?;
    let mut temp = ScratchDir {
        path: parent.join(format!(".{name}.tandem-restore-{}", std::process::id())),
        keep: false,
    };
    let _ = fs::remove_dir_all(&temp.path);
    fs::create_dir(&temp.path).map_err(crate::archive::io_err(format!(
        "creating {}",
        temp.path.display()
    )))?;
    copy_backup(&backup, &m, &temp.path)?;
    drop(lock);
    let config = boost_cache(&temp.path)?;
    let rec = run_recover(&temp.path, until)?;
    restore_config(&temp.path, config)?;
    report.recovered_to = rec.recovered_to;
    report.recovery_seconds = rec.seconds;
    report.databases_verified = verify_databases(&temp.path, &m)?;
    if let Some(t) = until {
        let kept = restored_log_summary(&temp.path, &m)?;
        if let Some(last) = kept.last_commit_unix.filter(|last| *last > t) {
            return Err(ArchiveError::Check(format!(
                "recovery to {} kept a commit stamped {}: refusing the result",
                rfc3339(t),
                rfc3339(last)
            )));
        }
        report.last_commit_kept = kept.last_commit_unix.map(rfc3339);
    }
    let info = serde_json::json!({
        "restored_from": report.backup, "env_id": m.env_id, "base_id": m.base_id, "log_end": m.log_end,
        "until": report.until, "recovered_to": report.recovered_to, "unix_ms": tandem_shared::now_unix_ms(),
    });
    let info_path = temp.path.join(RESTORE_INFO_FILE);
    fs::write(
        &info_path,
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(crate::archive::io_err(format!(
        "writing {}",
        info_path.display()
    )))?;
    fsync_tree(&temp.path).map_err(crate::archive::io_err(format!(
        "fsync of {}",
        temp.path.display()
    )))?;
    fs::rename(&temp.path, &opts.to).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => ArchiveError::TargetNotEmpty(opts.to.clone()),
        _ => crate::archive::io_err(format!(
            "renaming the restored environment to {}",
            opts.to.display()
        ))(e),
    })?;
    temp.keep = true;
    fsync_dir(&parent).map_err(crate::archive::io_err(format!(
        "fsync of {}",
        parent.display()
    )))?;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(backup = %report.backup, target = %report.target, until = ?report.until, "restored");
    Ok(report)
}

/// The commits left in a restored environment's log (recovery to a time
/// truncates the log after the last transaction it keeps).
fn restored_log_summary(home: &Path, m: &Manifest) -> Result<LogSummary, ArchiveError> {
    let log_dir = home.join(&m.log_dir);
    let mut numbers: Vec<u32> = fs::read_dir(&log_dir)
        .map_err(crate::archive::io_err(format!(
            "listing {}",
            log_dir.display()
        )))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name))
        .filter(|n| *n >= m.log_start.file)
        .collect();
    numbers.sort_unstable();
    let mut last = m.log_start.file;
    for n in numbers {
        if n == last + 1 {
            last = n;
        }
    }
    if fs::symlink_metadata(log_dir.join(tandem_shared::logfile::log_file_name(m.log_start.file)))
        .is_err()
    {
        return Err(ArchiveError::Check(format!(
            "recovery removed {}",
            log_rel_name(&m.log_dir, m.log_start.file)
        )));
    }
    scan_logs(&log_dir, m.log_start.file, last, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        let t = 1_795_636_648; // 2026-11-25T19:57:28Z
        assert_eq!(parse_time("@1795636648").unwrap(), t);
        assert_eq!(parse_time("2026-11-25T19:57:28Z").unwrap(), t);
        assert_eq!(parse_time("2026-11-25t19:57:28z").unwrap(), t);
        assert_eq!(
            parse_time("2026-11-25T19:57:28.999Z").unwrap(),
            t,
            "fractions are dropped"
        );
        assert_eq!(parse_time("2026-11-25T21:57:28+02:00").unwrap(), t);
        assert_eq!(parse_time("2026-11-25T14:27:28-0530").unwrap(), t);
        assert_eq!(parse_time("2026-11-25T19:57Z").unwrap(), t - 28);
        // Zone-less forms are local time, like db_recover's own.
        let local = to_unix(
            &Fields {
                year: 2026,
                month: 11,
                day: 25,
                hour: 19,
                minute: 57,
                second: 28,
            },
            Zone::Local,
        )
        .unwrap();
        assert_eq!(parse_time("2026-11-25 19:57:28").unwrap(), local);
        assert_eq!(parse_time("202611251957.28").unwrap(), local);
        assert_eq!(parse_time("2611251957.28").unwrap(), local);
        assert_eq!(parse_bdb("6911251957", 2026).unwrap().0.year, 1969);
        assert_eq!(parse_bdb("6811251957", 2026).unwrap().0.year, 2068);
        assert_eq!(
            parse_bdb("11251957.05", 2031).unwrap().0,
            Fields {
                year: 2031,
                month: 11,
                day: 25,
                hour: 19,
                minute: 57,
                second: 5
            }
        );
    }

    #[test]
    fn refuses_malformed_and_impossible_times() {
        for bad in [
            "",
            "yesterday",
            "@",
            "@12x",
            "@-5",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "2026-11-25T19:60:00Z",
            "2026-11-25T19:57:28+25:00",
            "2026-11-25T19:57:28 UTC",
            "2026-11-25",
            "12345",
            "202611251957.5",
            "1795636648",
            "@99999999999",
        ] {
            assert!(
                matches!(parse_time(bad), Err(ArchiveError::BadTime { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!(parse_time("2028-02-29T00:00:00Z").is_ok(), "a leap day");
    }

    #[test]
    fn bdb_time_round_trips() {
        for t in [0i64, 951_782_400, 1_795_636_648, i64::from(i32::MAX)] {
            let s = crate::archive::bdb_time_utc(t);
            let (f, _) = parse_bdb(&s, 0).unwrap();
            assert_eq!(to_unix(&f, Zone::Utc).unwrap(), t, "{s}");
        }
        assert_eq!(
            crate::archive::bdb_time_utc(1_795_636_648),
            "202611251957.28"
        );
        assert_eq!(rfc3339(1_795_636_648), "2026-11-25T19:57:28Z");
    }

    #[test]
    fn window_checks() {
        let s = LogSummary {
            first_commit_unix: Some(100),
            last_commit_unix: Some(200),
            earliest_checkpoint_unix: Some(120),
            ..Default::default()
        };
        let p = Path::new("b");
        assert_eq!(check_window(120, &s, p).unwrap(), (120, 200));
        assert_eq!(check_window(200, &s, p).unwrap(), (120, 200));
        assert!(matches!(
            check_window(99, &s, p),
            Err(ArchiveError::OutsideWindow { .. })
        ));
        assert!(matches!(
            check_window(110, &s, p),
            Err(ArchiveError::OutsideWindow { .. })
        ));
        assert!(matches!(
            check_window(201, &s, p),
            Err(ArchiveError::OutsideWindow { .. })
        ));
        let no_ckp = LogSummary {
            earliest_checkpoint_unix: None,
            ..s.clone()
        };
        assert!(matches!(
            check_window(150, &no_ckp, p),
            Err(ArchiveError::NoPointInTime { .. })
        ));
        let no_commit = LogSummary::default();
        assert!(matches!(
            check_window(150, &no_commit, p),
            Err(ArchiveError::NoPointInTime { .. })
        ));
    }

    #[test]
    fn an_empty_directory_is_a_valid_target_and_anything_else_is_not() {
        let d = tempfile::tempdir().unwrap();
        assert!(ensure_empty_target(&d.path().join("new")).is_ok());
        std::fs::create_dir(d.path().join("empty")).unwrap();
        assert!(ensure_empty_target(&d.path().join("empty")).is_ok());
        std::fs::create_dir(d.path().join("full")).unwrap();
        std::fs::write(d.path().join("full/x"), b"x").unwrap();
        assert!(matches!(
            ensure_empty_target(&d.path().join("full")),
            Err(ArchiveError::TargetNotEmpty(_))
        ));
        std::fs::write(d.path().join("file"), b"x").unwrap();
        assert!(matches!(
            ensure_empty_target(&d.path().join("file")),
            Err(ArchiveError::TargetNotEmpty(_))
        ));
    }
}
