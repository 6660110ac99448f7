//! Section 1's floor: the CPU seconds per GiB of each step a verified,
//! encrypted copy cannot skip, measured on this machine in the same run as
//! the copy, so the report can say what bounds it: a read of the files
//! (the primary reads each page twice for the torn-page check), one memory
//! copy, blake3 page by page, wide and in 1 MiB pieces, AES-GCM and
//! ChaCha20-Poly1305 sealing and opening TLS-sized records (ring, as
//! rustls uses it), and one loopback TCP connection's sender and receiver.

use super::*;
use ring::aead;

/// The steps measured, in report order: (key, label).
pub(crate) const FLOOR_STEPS: [(&str, &str); 12] = [
    (
        "read",
        "read the files, warm cache (`pread` into user memory)",
    ),
    ("memcpy", "one memory copy (1 MiB buffers)"),
    (
        "blake3-page",
        "blake3 page by page, 4 KiB pages (`blake3::hash`)",
    ),
    (
        "blake3-wide",
        "blake3 of 4 KiB pages, SIMD lanes full (`pages::page_hashes`)",
    ),
    ("blake3-1m", "blake3 of 1 MiB pieces"),
    ("aes128-seal", "AES-128-GCM seal, 16 KiB records (ring)"),
    ("aes128-open", "AES-128-GCM open, 16 KiB records (ring)"),
    ("aes256-seal", "AES-256-GCM seal, 16 KiB records (ring)"),
    ("aes256-open", "AES-256-GCM open, 16 KiB records (ring)"),
    (
        "chacha-seal",
        "ChaCha20-Poly1305 seal, 16 KiB records (ring)",
    ),
    (
        "tcp-send",
        "loopback TCP, sending thread (1 MiB writes; loopback runs the receive path here too)",
    ),
    ("tcp-recv", "loopback TCP, receiving thread (1 MiB reads)"),
];

/// CPU seconds this thread has run.
pub(crate) fn thread_cpu_secs() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// CPU seconds (user + system) of this process's waited-for children.
pub(crate) fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage fills one rusage we own.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

fn pseudo_random(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Runs `step` over `bytes` bytes in 1 MiB pieces; CPU seconds per GiB.
fn per_gib(bytes: u64, mut step: impl FnMut(&mut [u8])) -> f64 {
    let mut buf = pseudo_random(1 << 20);
    let started = thread_cpu_secs();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        step(&mut buf[..n]);
        left -= n as u64;
    }
    std::hint::black_box(&buf);
    (thread_cpu_secs() - started) / (bytes as f64 / GIB)
}

const GIB: f64 = (1u64 << 30) as f64;
/// TLS 1.3's largest record.
const RECORD: usize = 16 << 10;

fn aead_per_gib(bytes: u64, alg: &'static aead::Algorithm, open: bool) -> Result<f64> {
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(alg, &vec![7u8; alg.key_len()]).map_err(|_| anyhow!("aead key"))?,
    );
    let nonce = || aead::Nonce::assume_unique_for_key([3u8; 12]);
    // A sealed record to open again and again (opening checks the tag).
    let mut sealed = pseudo_random(RECORD);
    let tag = key
        .seal_in_place_separate_tag(nonce(), aead::Aad::empty(), &mut sealed)
        .map_err(|_| anyhow!("seal"))?;
    sealed.extend_from_slice(tag.as_ref());
    let mut failed = false;
    let mut scratch = sealed.clone();
    let secs = per_gib(bytes, |buf| {
        for rec in buf.chunks_mut(RECORD) {
            if open {
                scratch[..].copy_from_slice(&sealed);
                failed |= key
                    .open_in_place(nonce(), aead::Aad::empty(), &mut scratch)
                    .is_err();
            } else {
                failed |= key
                    .seal_in_place_separate_tag(nonce(), aead::Aad::empty(), rec)
                    .is_err();
            }
        }
    });
    if failed {
        bail!("ring refused a record");
    }
    // Opening restored the sealed record before each open: one copy of a
    // record per record, subtracted with the memcpy figure by the caller.
    Ok(secs)
}

/// Loopback TCP: (sender's, receiver's) CPU seconds per GiB.
fn tcp_per_gib(bytes: u64) -> Result<(f64, f64)> {
    let run = super::copy::tcp_loopback(bytes)?;
    let gib = bytes as f64 / GIB;
    Ok((run.send_cpu / gib, run.recv_cpu / gib))
}

/// Every step of [`FLOOR_STEPS`] once, over `bytes` bytes (the warm read
/// over the environment's files): CPU seconds per GiB by key.
pub(crate) fn measure_floor(
    env: &Path,
    files: &[(String, u64)],
    bytes: u64,
) -> Result<BTreeMap<&'static str, f64>> {
    let mut out = BTreeMap::new();
    read_files(env, files)?; // warm
    let started = thread_cpu_secs();
    read_files(env, files)?;
    out.insert("read", (thread_cpu_secs() - started) / (bytes as f64 / GIB));
    let mut other = vec![0u8; 1 << 20];
    out.insert(
        "memcpy",
        per_gib(bytes, |b| {
            other[..b.len()].copy_from_slice(b);
            std::hint::black_box(&other);
        }),
    );
    out.insert(
        "blake3-page",
        per_gib(bytes, |b| {
            for p in b.chunks(4096) {
                std::hint::black_box(blake3::hash(p));
            }
        }),
    );
    out.insert(
        "blake3-wide",
        per_gib(bytes, |b| {
            std::hint::black_box(tandem_shared::pages::page_hashes(b, 4096));
        }),
    );
    out.insert(
        "blake3-1m",
        per_gib(bytes, |b| {
            std::hint::black_box(blake3::hash(b));
        }),
    );
    let copy_per_record = out["memcpy"];
    out.insert(
        "aes128-seal",
        aead_per_gib(bytes, &aead::AES_128_GCM, false)?,
    );
    let open = aead_per_gib(bytes, &aead::AES_128_GCM, true)?;
    out.insert("aes128-open", (open - copy_per_record).max(0.0));
    out.insert(
        "aes256-seal",
        aead_per_gib(bytes, &aead::AES_256_GCM, false)?,
    );
    let open = aead_per_gib(bytes, &aead::AES_256_GCM, true)?;
    out.insert("aes256-open", (open - copy_per_record).max(0.0));
    out.insert(
        "chacha-seal",
        aead_per_gib(bytes, &aead::CHACHA20_POLY1305, false)?,
    );
    let (send, recv) = tcp_per_gib(bytes)?;
    out.insert("tcp-send", send);
    out.insert("tcp-recv", recv);
    Ok(out)
}

/// The floor table, then `cp`'s CPU against Tandem's per side and the
/// target on the primary's CPU per byte.
pub(crate) fn floor_table(
    s: &mut Section,
    floors: &[BTreeMap<&str, f64>],
    figs: &BTreeMap<(usize, &str), CopyFigures>,
    caches: &[Cache],
    bytes: u64,
) {
    if floors.is_empty() {
        return;
    }
    let col = |k: &str| -> Vec<f64> { floors.iter().filter_map(|f| f.get(k).copied()).collect() };
    let m = |k: &str| median(&col(k));
    let _ = writeln!(
        s.md,
        "What bounds the copy's CPU: each step a verified, encrypted copy cannot skip, in CPU seconds per GiB on this machine, \
         measured in this run (one thread each, median (min–max) of {} measurement(s)).\n\n| step | CPU s per GiB |\n|---|---|",
        floors.len()
    );
    for (k, label) in FLOOR_STEPS {
        let _ = writeln!(s.md, "| {label} | {} |", spread(&col(k), 3));
    }
    let primary_floor = 2.0 * m("read") + m("blake3-wide") + m("aes128-seal") + m("tcp-send");
    let standby_floor = m("tcp-recv") + m("aes128-open") + m("blake3-wide") + m("memcpy");
    let _ = writeln!(
        s.md,
        "| **sum, primary**: two reads (torn-page check) + wide blake3 + AES-128-GCM seal + TCP send | **{primary_floor:.3}** |\n\
         | **sum, standby**: TCP receive + AES-128-GCM open + wide blake3 + one copy into the page cache | **{standby_floor:.3}** |\n"
    );
    let gib = bytes as f64 / GIB;
    let _ = writeln!(
        s.md,
        "| CPU s per GiB | cache | `cp` (user + system) | Tandem primary | Tandem standby | primary ÷ cp | primary ÷ its floor |\n|---|---|---|---|---|---|---|"
    );
    for (ci, &cache) in caches.iter().enumerate() {
        let (Some(t), Some(cp)) = (figs.get(&(ci, "tandem")), figs.get(&(ci, "cp"))) else {
            continue;
        };
        let per = |v: &[f64]| -> Vec<f64> { v.iter().map(|c| c / gib).collect() };
        let (cpc, pc, sc) = (per(&cp.cpu), per(&t.primary_cpu), per(&t.standby_cpu));
        let ratio = median(&pc) / median(&cpc);
        let _ = writeln!(
            s.md,
            "| | {} | {} | {} | {} | {ratio:.2} | {:.2} |",
            cache.name(),
            spread(&cpc, 3),
            spread(&pc, 2),
            spread(&sc, 2),
            median(&pc) / primary_floor
        );
        s.targets.push(Target {
            what: format!("primary CPU per byte vs cp's ({})", cache.name()),
            goal: "≤ 1.0× cp".into(),
            measured: format!(
                "{ratio:.2}× ({:.2} vs {:.3} CPU-s per GiB; the primary's unavoidable steps alone: {primary_floor:.2}, {:.2}× cp)",
                median(&pc),
                median(&cpc),
                primary_floor / median(&cpc)
            ),
            met: Some(ratio <= 1.0),
        });
    }
    let _ = writeln!(s.md);
}
