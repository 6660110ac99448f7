//! Chunk compression negotiated in the handshake (issue #14, slow links):
//! with zstd on both sides the stream is compressed and still ends exact;
//! a standby that offers no encoding (an old one, or `--compression off`)
//! gets every chunk as it is and ends exact too. Real binaries, real
//! Berkeley DB, mutual TLS on loopback.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tandem_tests::bdb::{self, WORKLOAD_DBS};
use tandem_tests::harness::*;

const CATCH_UP: Duration = Duration::from_secs(180);

/// Base copy of an existing environment, then the log of a live workload;
/// the recovered standby must hold exactly what the primary committed.
/// Returns the primary's metrics at the end.
fn stream_and_check(
    primary_extra: &[&str],
    standby_extra: &[&str],
) -> Result<BTreeMap<String, f64>> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(3000, 500))?;
    let metrics = free_addr()?;
    let mut args = vec!["--metrics-listen", &metrics];
    args.extend(primary_extra);
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &args)?;
    let mut w = s.spawn_workload(&workload(10_000, 500), "workload.log")?;
    let _standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        standby_extra,
    )?;
    let status = w.wait_exit(Duration::from_secs(300))?;
    anyhow::ensure!(status.success(), "workload failed: {}", w.log_text());
    let last = bdb::parse_done(&w.log_text()).context("no DONE line from the workload")?;
    wait_caught_up(&s.path("standby"), &s.path("env"), CATCH_UP)?;
    let copy = s.path("recovered");
    assert_eq!(
        recover_copy(&s.path("standby"), &copy)?,
        last,
        "the recovered standby must hold every committed transaction"
    );
    assert_eq!(
        bdb::db_dump_all(&s.path("env"), &WORKLOAD_DBS)?,
        bdb::db_dump_all(&copy, &WORKLOAD_DBS)?,
        "db_dump differs"
    );
    scrape_metrics(&metrics)
}

#[test]
fn zstd_on_both_sides_compresses_and_ends_exact() -> Result<()> {
    let m = stream_and_check(&[], &[])?;
    let raw = metric(&m, "tandem_primary_chunk_payload_bytes_total")?;
    let wire = metric(&m, "tandem_primary_chunk_wire_bytes_total")?;
    let zstd = metric(&m, "tandem_primary_chunks_zstd_total")?;
    eprintln!("payload {raw} bytes, on the wire {wire} bytes, {zstd} zstd chunks");
    assert!(zstd > 0.0, "no chunk was compressed");
    // The workload's pages and log are text-like records: they compress.
    assert!(
        wire * 2.0 < raw,
        "compression saved too little: {wire} of {raw} bytes sent"
    );
    Ok(())
}

#[test]
fn a_standby_offering_no_encoding_gets_chunks_as_they_are() -> Result<()> {
    // `--compression off` sends a Hello without encodings: on the wire the
    // same as a standby older than compression.
    let m = stream_and_check(&[], &["--compression", "off"])?;
    assert_eq!(metric(&m, "tandem_primary_chunks_zstd_total")?, 0.0);
    assert_eq!(
        metric(&m, "tandem_primary_chunk_payload_bytes_total")?,
        metric(&m, "tandem_primary_chunk_wire_bytes_total")?
    );
    Ok(())
}

#[test]
fn a_primary_with_compression_off_sends_chunks_as_they_are() -> Result<()> {
    let m = stream_and_check(&["--compression", "off"], &[])?;
    assert_eq!(metric(&m, "tandem_primary_chunks_zstd_total")?, 0.0);
    Ok(())
}
