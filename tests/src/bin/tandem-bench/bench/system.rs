//! Processes and files: commands with timeouts, CPU time and peak RSS of a
//! process, the page cache, log sizes, progress lines.

use super::*;

/// Runs `cmd` to completion within `timeout`, output into `log`; fails on a
/// non-zero exit with the output.
pub(crate) fn run_cmd(
    what: &str,
    mut cmd: Command,
    timeout: Duration,
    log: &Path,
) -> Result<Duration> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let status = wait_child(&mut child, timeout).with_context(|| {
        format!(
            "{what}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    let took = started.elapsed();
    if !status.success() {
        bail!(
            "{what} failed ({status}): {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(took)
}

pub(crate) fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `cmd` within `timeout` and returns its stdout; stderr goes to `log`.
pub(crate) fn cmd_stdout(
    what: &str,
    mut cmd: Command,
    timeout: Duration,
    log: &Path,
) -> Result<String> {
    let out_path = log.with_extension("stdout");
    let out = File::create(&out_path)?;
    let err = File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let status = wait_child(&mut child, timeout).with_context(|| what.to_owned())?;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "{what} failed ({status}): {stdout}{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(stdout)
}

pub(crate) fn first_line(mut cmd: Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

/// utime + stime of a process, in seconds.
pub(crate) fn proc_cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: f64 = f
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .context("utime")?
        + f.get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .context("stime")?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok(ticks / if hz > 0.0 { hz } else { 100.0 })
}

/// Peak resident set (VmHWM) of a process, in MiB.
pub(crate) fn proc_hwm_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM")?;
    Ok(kb / 1024.0)
}

/// Resident set now (VmRSS) of a process, in MiB.
pub(crate) fn proc_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

/// Bytes free for an unprivileged user on the file system holding `p`.
pub(crate) fn free_bytes(p: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(p).with_context(|| format!("statvfs {}", p.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

pub(crate) fn sync_all() {
    rustix::fs::sync();
}

/// Writes back dirty pages and drops the page cache; false without the
/// privilege.
pub(crate) fn drop_caches() -> bool {
    sync_all();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// lg_max from the newest log file's header.
pub(crate) fn env_lg_max(env: &Path) -> Result<u32> {
    let layout = EnvLayout::open(env)?;
    let newest = *layout.log_files()?.last().context("no log file")?;
    let w = walk_file(&File::open(layout.log_path(newest))?, None)?;
    Ok(w.header
        .map(|h| h.lg_max)
        .filter(|&m| m > 0)
        .unwrap_or(LG_MAX as u32))
}

pub(crate) fn log_mib_between(a: LogPosition, b: LogPosition, lg_max: u32) -> f64 {
    a.bytes_until(b, lg_max) as f64 / MIB
}

pub(crate) fn remove_dir(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

pub(crate) fn status_u64(s: &serde_json::Value, key: &str) -> u64 {
    s[key].as_u64().unwrap_or(0)
}

pub(crate) fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench {}] {}", chrono_like_now(), msg.as_ref());
}

pub(crate) fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}
