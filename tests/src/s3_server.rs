//! The S3 server the `archive_s3` tests archive to, on loopback: which
//! server is chosen here only ([`start_s3`]). Today s3s-fs (installed by
//! scripts/setup; `TANDEM_S3_SERVER` names another binary with the same
//! flags): an S3 API over a local directory, where each bucket is a
//! directory and each object a file, so tests can damage objects directly.

use crate::archive_cmd::{standby_cmd, Run};
use crate::harness::{free_port, wait_for, Proc};
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const ACCESS_KEY: &str = "tandem-test";
pub const SECRET_KEY: &str = "tandem-test-secret";
pub const BUCKET: &str = "tandem";

pub struct S3Server {
    pub proc: Proc,
    pub port: u16,
    /// The server's data directory (`root/BUCKET/KEY` is an object).
    pub root: PathBuf,
    log: PathBuf,
}

fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_S3_SERVER") {
        return p.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cargo_bin = home.join(".cargo/bin/s3s-fs");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        PathBuf::from("s3s-fs")
    }
}

/// Starts the server on a free loopback port with one bucket, [`BUCKET`].
pub fn start_s3(dir: &Path) -> Result<S3Server> {
    let root = dir.join("s3-data");
    std::fs::create_dir_all(root.join(BUCKET))?;
    let port = free_port()?;
    let log = dir.join("s3-server.log");
    let proc = spawn(&root, port, &log)?;
    let s = S3Server {
        proc,
        port,
        root,
        log,
    };
    s.wait_ready()?;
    Ok(s)
}

fn spawn(root: &Path, port: u16, log: &Path) -> Result<Proc> {
    let mut cmd = Command::new(server_binary());
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root);
    Proc::spawn("s3s-fs", cmd, log)
        .context("starting the S3 server (scripts/setup installs s3s-fs)")
}

impl S3Server {
    fn wait_ready(&self) -> Result<()> {
        wait_for("the S3 server to listen", Duration::from_secs(20), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok())
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://BUCKET/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Where object `key` of the bucket is on disk.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    /// Object keys under `prefix` (relative to the bucket), sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let base = self.root.join(BUCKET);
        let mut stack = vec![base.join(prefix)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&base) {
                    let rel = rel.to_string_lossy().into_owned();
                    if !rel.contains(".internal.") && !rel.starts_with(".s3s") {
                        out.push(rel);
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// How many objects the server recorded as completed multipart uploads
    /// (an ETag `<md5>-<parts>` in its `.internal.json` side files).
    pub fn multipart_etags(&self) -> usize {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".internal.json"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter(|t| {
                t.split('"').any(|w| {
                    w.split_once('-')
                        .is_some_and(|(h, n)| h.len() == 32 && n.parse::<u32>().is_ok())
                })
            })
            .count()
    }

    /// Side files of multipart uploads begun and neither completed nor
    /// aborted (`.upload-<id>.json`, `.upload_id-<id>.part-<n>`).
    pub fn incomplete_uploads(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload-") || n.starts_with(".upload_id-"))
            .collect()
    }

    /// The environment a `tandem-standby` talking to this server gets.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// Runs `tandem-standby ARGS` with [`Self::env`].
    pub fn standby<I, S>(&self, args: I) -> Result<Run>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        standby_cmd(args, &env)
    }

    /// Starts the server again on the same port and data, after its
    /// process died (the caller killed it): the new process, for the
    /// caller to keep.
    pub fn start_again(&self) -> Result<Proc> {
        let p = spawn(&self.root, self.port, &self.log)?;
        self.wait_ready()?;
        Ok(p)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// data.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill9()?;
        self.proc = spawn(&self.root, self.port, &self.log)?;
        self.wait_ready()
    }
}
