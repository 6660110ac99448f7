//! Section 1, `copy`: base copy against cp, rsync over ssh, db_hotbackup
//! and the machine's limits.

use super::*;

#[derive(Default)]
pub(crate) struct CopyFigures {
    pub(crate) secs: Vec<f64>,
    /// Tandem only: CPU seconds of the primary and of the standby.
    pub(crate) primary_cpu: Vec<f64>,
    pub(crate) standby_cpu: Vec<f64>,
    pub(crate) bytes: Vec<f64>,
    /// `cp` only: its CPU seconds (user + system).
    pub(crate) cpu: Vec<f64>,
}

pub(crate) const COPY_METHODS: [&str; 8] = [
    "tandem",
    "cp",
    "rsync-ssh",
    "hotbackup",
    "tcp-loopback",
    "disk-write",
    "disk-read",
    "blake3",
];

pub(crate) fn method_label(m: &str) -> &'static str {
    match m {
        "tandem" => "**Tandem** (gRPC + mTLS + blake3, standby fsyncs)",
        "cp" => "`cp` of the same files + `sync`",
        "rsync-ssh" => "`rsync -a` over ssh (loopback) + `sync`",
        "hotbackup" => "`db5.3_hotbackup -h ENV -b DIR` + `sync`",
        "tcp-loopback" => "limit: raw TCP on loopback (memory to memory)",
        "disk-write" => "limit: `dd` sequential write + fsync",
        "disk-read" => "limit: read the files (`cat` > /dev/null)",
        "blake3" => "limit: blake3 on one core (in memory)",
        _ => "?",
    }
}

pub(crate) struct Sshd {
    pub(crate) _proc: Proc,
    pub(crate) port: u16,
    pub(crate) key: PathBuf,
    pub(crate) user: String,
}

impl Sshd {
    /// A private sshd on 127.0.0.1 with its own host key and one authorized
    /// key, all in `dir`; killed when dropped.
    pub(crate) fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::create_dir_all("/run/sshd");
        for k in ["host_key", "client_key"] {
            let p = dir.join(k);
            let _ = std::fs::remove_file(&p);
            run_cmd(
                "ssh-keygen",
                keygen(&p),
                Duration::from_secs(30),
                &dir.join(format!("{k}.log")),
            )?;
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = free_port()?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nPrintMotd no\n",
            hk = dir.join("host_key").display(),
            ak = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display()
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(dir.join("sshd_config"));
        let mut proc = Proc::spawn("sshd", cmd, &dir.join("sshd.log"))?;
        wait_while_running("sshd to listen", Duration::from_secs(20), &mut proc, || {
            Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        let user = first_line({
            let mut c = Command::new("id");
            c.arg("-un");
            c
        });
        let sshd = Sshd {
            _proc: proc,
            port,
            key: dir.join("client_key"),
            user,
        };
        let mut probe = Command::new("ssh");
        probe
            .args(sshd.ssh_args())
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("true");
        run_cmd(
            "ssh to the private sshd",
            probe,
            Duration::from_secs(30),
            &dir.join("probe.log"),
        )?;
        Ok(sshd)
    }

    pub(crate) fn ssh_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.key.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }
}

pub(crate) fn keygen(path: &Path) -> Command {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(path);
    c
}

/// One loopback TCP run: wall time, and each thread's CPU seconds.
pub(crate) struct LoopbackRun {
    pub took: Duration,
    pub send_cpu: f64,
    pub recv_cpu: f64,
}

/// Sends `bytes` over one loopback TCP connection, 1 MiB writes, from one
/// thread to another that reads and discards.
pub(crate) fn tcp_loopback(bytes: u64) -> Result<LoopbackRun> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> Result<(u64, f64)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut got, started) = (0u64, floor::thread_cpu_secs());
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((got, floor::thread_cpu_secs() - started));
            }
            got += n as u64;
        }
    });
    let started = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let cpu_started = floor::thread_cpu_secs();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    let send_cpu = floor::thread_cpu_secs() - cpu_started;
    let (got, recv_cpu) = receiver
        .join()
        .map_err(|_| anyhow!("receiver panicked"))??;
    let took = started.elapsed();
    if got != bytes {
        bail!("loopback receiver got {got} of {bytes} bytes");
    }
    Ok(LoopbackRun {
        took,
        send_cpu,
        recv_cpu,
    })
}

pub(crate) fn blake3_one_core(bytes: u64) -> Duration {
    let buf: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let started = Instant::now();
    let mut left = bytes;
    let mut acc = 0u8;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        acc ^= blake3::hash(&buf[..n]).as_bytes()[0];
        left -= n as u64;
    }
    std::hint::black_box(acc);
    started.elapsed()
}

pub(crate) fn read_files(env: &Path, files: &[(String, u64)]) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (name, _) in files {
        let mut f = File::open(env.join(name))?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

pub(crate) fn copy_timeout(bytes: u64) -> Duration {
    // Generous: 2 MB/s at worst, at least two minutes.
    Duration::from_secs((bytes / 2_000_000).max(120))
}

impl Bench {
    pub(crate) fn tandem_copy(
        &self,
        big: &BigEnv,
        dest: &Path,
        fig: &mut CopyFigures,
    ) -> Result<()> {
        let primary = big.primary.as_ref().context("no primary")?;
        let metrics = free_addr()?;
        let p0 = proc_cpu_secs(primary.proc.pid())?;
        let started = Instant::now();
        let mut sb = start_standby(
            self.root.path(),
            dest,
            &primary.url(),
            &self.certs,
            &["--metrics-listen", &metrics],
        )?;
        let mut standby_cpu = 0.0;
        let pid = sb.pid();
        wait_while_running(
            "the base copy to complete",
            copy_timeout(big.bytes),
            &mut sb,
            || {
                let m = scrape_metrics(&metrics)?;
                let done = m.get("tandem_standby_recoverable") == Some(&1.0)
                    && m.get("tandem_standby_connected") == Some(&1.0)
                    && m.get("tandem_standby_lag_bytes") == Some(&0.0);
                if done {
                    standby_cpu = proc_cpu_secs(pid)?;
                }
                Ok(done)
            },
        )?;
        let took = started.elapsed();
        let p1 = proc_cpu_secs(primary.proc.pid())?;
        sb.stop(Duration::from_secs(60))?;
        // The copy counts only if the directory is recoverable and holds the
        // primary's whole log (the primary is idle during this section).
        let st = standby_status(dest)?;
        let end = primary_log_end(&big.env)?;
        if st["recoverable"] != true || lsn_of(&st["durable_lsn"]) != end {
            bail!("the standby reported done but its directory is not caught up: durable {} vs primary {end}: {st}", lsn_of(&st["durable_lsn"]));
        }
        fig.secs.push(took.as_secs_f64());
        fig.primary_cpu.push(p1 - p0);
        fig.standby_cpu.push(standby_cpu);
        fig.bytes.push(
            (status_u64(&st, "file_bytes_received") + status_u64(&st, "log_bytes_received")) as f64,
        );
        Ok(())
    }

    /// Runs one copy method into a fresh `dest`; returns seconds.
    pub(crate) fn copy_once(
        &self,
        method: &str,
        big: &BigEnv,
        sshd: Option<&Sshd>,
        dest: &Path,
        fig: &mut CopyFigures,
    ) -> Result<()> {
        remove_dir(dest);
        let log = self.path(&format!("{method}.log"));
        let names: Vec<&str> = big.files.iter().map(|f| f.0.as_str()).collect();
        let timeout = copy_timeout(big.bytes);
        let secs = match method {
            "tandem" => return self.tandem_copy(big, dest, fig),
            "cp" => {
                std::fs::create_dir_all(dest)?;
                let cpu = children_cpu_secs();
                let started = Instant::now();
                let mut c = Command::new("cp");
                c.current_dir(&big.env).arg("-r").args(&names).arg(dest);
                run_cmd("cp", c, timeout, &log)?;
                fig.cpu.push(children_cpu_secs() - cpu);
                sync_all();
                started.elapsed()
            }
            "rsync-ssh" => {
                let sshd = sshd.context("no sshd")?;
                std::fs::create_dir_all(dest)?;
                let started = Instant::now();
                let mut c = Command::new("rsync");
                c.current_dir(&big.env)
                    .arg("-a")
                    .arg("-e")
                    .arg(format!("ssh {}", sshd.ssh_args().join(" ")))
                    .args(&names)
                    .arg(format!("{}@127.0.0.1:{}/", sshd.user, dest.display()));
                run_cmd("rsync over ssh", c, timeout, &log)?;
                sync_all();
                started.elapsed()
            }
            "hotbackup" => {
                let started = Instant::now();
                // Never -u or -c: they remove the source's logs (BDB-NOTES.md §6).
                let mut c = Command::new("db5.3_hotbackup");
                c.arg("-h").arg(&big.env).arg("-b").arg(dest);
                run_cmd("db5.3_hotbackup", c, timeout, &log)?;
                sync_all();
                started.elapsed()
            }
            "tcp-loopback" => tcp_loopback(big.bytes)?.took,
            "disk-write" => {
                std::fs::create_dir_all(dest)?;
                let mut c = Command::new("dd");
                c.arg("if=/dev/zero")
                    .arg(format!("of={}", dest.join("dd.out").display()))
                    .arg("bs=1M")
                    .arg(format!("count={}", big.bytes.div_ceil(1 << 20)))
                    .arg("conv=fsync")
                    .arg("status=none");
                run_cmd("dd", c, timeout, &log)?
            }
            "disk-read" => {
                let started = Instant::now();
                read_files(&big.env, &big.files)?;
                started.elapsed()
            }
            "blake3" => blake3_one_core(big.bytes),
            other => bail!("unknown method {other}"),
        };
        remove_dir(dest);
        fig.secs.push(secs.as_secs_f64());
        Ok(())
    }

    pub(crate) fn section_copy(&self, big: &mut BigEnv) -> Result<Section> {
        let cfg = &self.cfg;
        // Without sshd or rsync (bench/run installs them; a machine may
        // refuse), the rsync-ssh figures are left out, the rest stands.
        let sshd = match Sshd::start(&self.path("sshd")) {
            Ok(s) => Some(s),
            Err(e) => {
                progress(format!("copy: no sshd, rsync over ssh skipped: {e:#}"));
                None
            }
        };
        big.primary = Some(start_primary(
            self.root.path(),
            &big.env,
            &self.certs,
            "127.0.0.1:0",
            &[],
        )?);
        let mut figs: BTreeMap<(usize, &str), CopyFigures> = BTreeMap::new();
        let mut floors: Vec<BTreeMap<&str, f64>> = Vec::new();
        let caches: Vec<Cache> = cfg
            .caches
            .iter()
            .copied()
            .filter(|c| *c == Cache::Warm || self.can_drop_caches)
            .collect();
        for run in 0..cfg.runs {
            for (ci, &cache) in caches.iter().enumerate() {
                if cache == Cache::Warm {
                    read_files(&big.env, &big.files)?;
                }
                for method in COPY_METHODS {
                    if cache == Cache::Cold && matches!(method, "tcp-loopback" | "blake3") {
                        continue; // no disk involved: one figure is enough
                    }
                    if cache == Cache::Warm && method == "disk-write" && caches.len() > 1 {
                        continue; // the page cache does not change a write + fsync
                    }
                    if method == "rsync-ssh" && sshd.is_none() {
                        continue;
                    }
                    if cache == Cache::Cold {
                        drop_caches();
                    } else {
                        sync_all();
                    }
                    let dest = self.path(&format!("copy-{method}"));
                    let fig = figs.entry((ci, method)).or_default();
                    self.copy_once(method, big, sshd.as_ref(), &dest, fig)
                        .with_context(|| format!("{method} ({})", cache.name()))?;
                    progress(format!(
                        "copy run {}/{} {} {method}: {:.2} s",
                        run + 1,
                        cfg.runs,
                        cache.name(),
                        fig.secs.last().copied().unwrap_or(0.0)
                    ));
                    if method == "tandem" {
                        // Keep the last Tandem copy for section 5.
                        let last = run + 1 == cfg.runs && ci + 1 == caches.len();
                        if last {
                            let keep = self.path("resume-standby");
                            remove_dir(&keep);
                            std::fs::rename(&dest, &keep)?;
                            big.standby =
                                Some((keep, fig.bytes.last().copied().unwrap_or(0.0) as u64));
                        } else {
                            remove_dir(&dest);
                        }
                    }
                }
            }
            floors.push(measure_floor(&big.env, &big.files, big.bytes)?);
            progress(format!("copy run {}/{} floor measured", run + 1, cfg.runs));
        }
        big.copy_secs = caches
            .len()
            .checked_sub(1)
            .and_then(|ci| figs.get(&(ci, "tandem")))
            .map(|f| median(&f.secs));
        let primary_hwm = big
            .primary
            .as_ref()
            .map(|p| proc_hwm_mib(p.proc.pid()))
            .transpose()?
            .unwrap_or(0.0);

        let mib = big.bytes as f64 / MIB;
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 1. Base copy of a {mib:.0} MiB environment\n\n{} database and log files ({} bytes), loopback only. Throughput = environment bytes / wall time \
             (Tandem: from starting `tandem-standby run` until its metrics say recoverable, connected and lag 0, checked afterwards against the primary's \
             end of log; baselines: until the command and a following `sync` return). Median of {} run(s) (min–max).\n",
            big.files.len(),
            big.bytes,
            cfg.runs
        );
        if !self.can_drop_caches && cfg.caches.contains(&Cache::Cold) {
            let _ = writeln!(
                s.md,
                "Cold runs skipped: cannot write /proc/sys/vm/drop_caches.\n"
            );
        }
        let _ = writeln!(
            s.md,
            "| method | cache | time s | MiB/s | Tandem ÷ this |\n|---|---|---|---|---|"
        );
        for (ci, &cache) in caches.iter().enumerate() {
            let Some(tandem) = figs.get(&(ci, "tandem")) else {
                continue;
            };
            let t_mbps = mib / median(&tandem.secs);
            for method in COPY_METHODS {
                let Some(f) = figs.get(&(ci, method)) else {
                    continue;
                };
                let mbps: Vec<f64> = f.secs.iter().map(|s| mib / s).collect();
                let ratio = if method == "tandem" {
                    "1.00".to_owned()
                } else {
                    format!("{:.2}", t_mbps / median(&mbps))
                };
                let _ = writeln!(
                    s.md,
                    "| {} | {} | {} | {} | {ratio} |",
                    method_label(method),
                    cache.name(),
                    spread(&f.secs, 2),
                    spread(&mbps, 0)
                );
            }
        }
        let _ = writeln!(s.md);
        // Costs of the Tandem copy.
        let _ = writeln!(
            s.md,
            "| Tandem base copy | cache | primary CPU s per GiB | standby CPU s per GiB | bytes received ÷ environment bytes |\n|---|---|---|---|---|"
        );
        for (ci, &cache) in caches.iter().enumerate() {
            let Some(t) = figs.get(&(ci, "tandem")) else {
                continue;
            };
            let gib = big.bytes as f64 / (1024.0 * MIB);
            let pc: Vec<f64> = t.primary_cpu.iter().map(|c| c / gib).collect();
            let sc: Vec<f64> = t.standby_cpu.iter().map(|c| c / gib).collect();
            let rx: Vec<f64> = t.bytes.iter().map(|b| b / big.bytes as f64).collect();
            let _ = writeln!(
                s.md,
                "| | {} | {} | {} | {} |",
                cache.name(),
                spread(&pc, 2),
                spread(&sc, 2),
                spread(&rx, 3)
            );
        }
        let _ = writeln!(
            s.md,
            "\nPeak RSS (VmHWM) of tandem-primary after all copies: {primary_hwm:.0} MiB.\n"
        );
        floor_table(&mut s, &floors, &figs, &caches, big.bytes);

        for (ci, &cache) in caches.iter().enumerate() {
            let (Some(t), Some(cp)) = (figs.get(&(ci, "tandem")), figs.get(&(ci, "cp"))) else {
                continue;
            };
            let vs_cp = median(&cp.secs) / median(&t.secs);
            s.targets.push(Target {
                what: format!("base copy vs local cp ({})", cache.name()),
                goal: "≥ 0.80× cp".into(),
                measured: format!(
                    "{vs_cp:.2}× ({:.0} vs {:.0} MiB/s)",
                    mib / median(&t.secs),
                    mib / median(&cp.secs)
                ),
                met: Some(vs_cp >= 0.8),
            });
            s.targets.push(Target {
                what: format!("base copy wall time vs cp -r + sync ({})", cache.name()),
                goal: "≤ 1.25× cp (issue #14)".into(),
                measured: format!(
                    "{:.2}× ({:.2} vs {:.2} s)",
                    1.0 / vs_cp,
                    median(&t.secs),
                    median(&cp.secs)
                ),
                met: Some(1.0 / vs_cp <= 1.25),
            });
            let Some(rs) = figs.get(&(ci, "rsync-ssh")) else {
                continue;
            };
            let vs_rsync = median(&rs.secs) / median(&t.secs);
            s.targets.push(Target {
                what: format!("base copy vs rsync over ssh ({})", cache.name()),
                goal: "≥ 2× rsync".into(),
                measured: format!(
                    "{vs_rsync:.2}× ({:.0} vs {:.0} MiB/s)",
                    mib / median(&t.secs),
                    mib / median(&rs.secs)
                ),
                met: Some(vs_rsync >= 2.0),
            });
        }
        Ok(s)
    }
}
