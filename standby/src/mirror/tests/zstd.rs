//! zstd-encoded chunks from the primary: decoded before the digest check
//! and written as the original bytes; a corrupted frame, a size lie, a bomb
//! or a zstd chunk this standby did not offer to accept is refused before a
//! byte is written (`refuse` checks the directory, state and log tail).
//! Uses the fixtures of `mirror::tests` (`tests/mod.rs`).

use super::*;
use tandem_shared::compress::{Encoder, WireStats, ZSTD};
use tandem_shared::wire::ChunkEncoding;

/// `kind` as the primary sends it with zstd agreed.
fn encoded(kind: Kind) -> Kind {
    let enc = Encoder::new(ZSTD, std::sync::Arc::new(WireStats::default()));
    enc.encode_kind(kind, tandem_shared::compress::QueueFill::Partly)
}

/// Compressible page-like bytes.
fn text_bytes(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = 0;
    while v.len() < len {
        v.extend_from_slice(format!("{{\"order\":{i},\"status\":\"shipped\"}}").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn with_zstd(kind: Kind, f: impl FnOnce(&mut bytes::Bytes, &mut u64)) -> Kind {
    match kind {
        Kind::FileChunk(mut c) => {
            assert_eq!(c.encoding, ChunkEncoding::Zstd as i32, "not compressed");
            f(&mut c.data, &mut c.raw_len);
            Kind::FileChunk(c)
        }
        Kind::LogChunk(mut c) => {
            assert_eq!(c.encoding, ChunkEncoding::Zstd as i32, "not compressed");
            f(&mut c.data, &mut c.raw_len);
            Kind::LogChunk(c)
        }
        other => other,
    }
}

#[test]
fn zstd_file_chunks_are_written_as_the_original_bytes() {
    let mut fx = populated();
    let data = text_bytes(16384);
    fx.ok(file_start("new.db", data.len() as u64, FileKind::Database));
    fx.ok(encoded(file_chunk("new.db", 0, &data[..8192])));
    fx.ok(file_chunk("new.db", 8192, &data[8192..])); // mixed with plain ones
    fx.ok(file_end("new.db", data.len() as u64));
    assert_eq!(std::fs::read(fx.root().join("new.db")).expect("read"), data);
}

#[test]
fn zstd_log_chunks_are_appended_as_the_original_bytes() {
    let mut fx = populated();
    let (file, at, recs) = next_records(&fx.m, 40, 20);
    let a = fx.ok(encoded(log_chunk(file, at, &recs)));
    assert_eq!(a.log_bytes, recs.len() as u64);
}

#[test]
fn lying_or_corrupted_zstd_chunks_are_refused_before_a_byte_is_written() {
    let mut fx = populated();
    let data = text_bytes(16384);
    fx.ok(file_start("new.db", data.len() as u64, FileKind::Database));
    let good = encoded(file_chunk("new.db", 0, &data));
    let lies: Vec<(&str, Kind)> = vec![
        (
            "does not decode",
            with_zstd(good.clone(), |_, raw| *raw -= 1),
        ),
        ("decodes to", with_zstd(good.clone(), |_, raw| *raw += 100)),
        ("over the", with_zstd(good.clone(), |_, raw| *raw = 1 << 40)),
        (
            "does not decode",
            with_zstd(good.clone(), |d, _| {
                let mut v = d.to_vec();
                let n = v.len();
                v[n / 2] ^= 0x81;
                v.truncate(n - 4);
                *d = v.into();
            }),
        ),
    ];
    for (says, kind) in lies {
        let err = fx.refuse(kind);
        assert!(matches!(&err, ApplyError::Protocol(_)), "{err:?}");
        assert!(err.to_string().contains(says), "{err}");
    }
    // A log chunk that lies likewise.
    let (file, at, recs) = next_records(&fx.m, 40, 20);
    let err = fx.refuse(with_zstd(encoded(log_chunk(file, at, &recs)), |_, raw| {
        *raw /= 2
    }));
    assert!(err.to_string().contains("does not decode"), "{err}");
    // A standby started with --compression off did not offer zstd.
    fx.m.accepts_zstd = false;
    let err = fx.refuse(good.clone());
    assert!(err.to_string().contains("did not offer zstd"), "{err}");
    fx.m.accepts_zstd = true;
    fx.ok(good);
}
