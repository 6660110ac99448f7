//! Chunks of files and log from the primary: past the declared size, for an
//! unknown file, out of order, with a bad digest, log that does not
//! continue the standby's log or is not valid records. Every refusal is
//! checked with `refuse`; uses the fixtures of `mirror::tests` (`tests/mod.rs`).

use super::*;

// -------------------------------------------------------------- 3: chunks

#[test]
fn a_chunk_past_the_declared_size_is_refused() {
    let mut fx = populated();
    let data = db_bytes(6000, 5);
    fx.ok(file_start("new.db", 5000, FileKind::Database));
    let err = fx.refuse(file_chunk("new.db", 0, &data));
    assert!(
        matches!(
            err,
            ApplyError::PastDeclaredSize {
                offset: 0,
                len: 6000,
                size: 5000,
                ..
            }
        ),
        "{err:?}"
    );
    fx.ok(file_chunk("new.db", 0, &data[..4096]));
    let err = fx.refuse(file_chunk("new.db", 4096, &data[4096..]));
    assert!(
        matches!(
            err,
            ApplyError::PastDeclaredSize {
                offset: 4096,
                len: 1904,
                size: 5000,
                ..
            }
        ),
        "{err:?}"
    );
    // One byte over.
    let err = fx.refuse(file_chunk("new.db", 4096, &data[4096..5001]));
    assert!(
        matches!(err, ApplyError::PastDeclaredSize { .. }),
        "{err:?}"
    );
    fx.ok(file_chunk("new.db", 4096, &data[4096..5000]));
    // Nothing more fits, not even one byte.
    let err = fx.refuse(file_chunk("new.db", 5000, &data[5000..5001]));
    assert!(
        matches!(err, ApplyError::PastDeclaredSize { .. }),
        "{err:?}"
    );
    fx.ok(file_end("new.db", 5000));
    assert_eq!(
        std::fs::read(fx.root().join("new.db")).expect("read"),
        &data[..5000]
    );
}

#[test]
fn a_chunk_for_an_unknown_file_is_refused() {
    let mut fx = populated();
    // No FileStart at all, even for a file the standby holds.
    for name in ["data.db", "never-started.db", "../escape.db"] {
        let err = fx.refuse(file_chunk(name, 0, b"hello"));
        assert!(
            matches!(&err, ApplyError::UnknownFile(n) if n == name),
            "{err:?}"
        );
        let err = fx.refuse(file_end(name, 5));
        assert!(
            matches!(&err, ApplyError::UnknownFile(n) if n == name),
            "{err:?}"
        );
    }
    // A FileStart for another file.
    fx.ok(file_start("a.db", 100, FileKind::Database));
    let err = fx.refuse(file_chunk("b.db", 0, b"hello"));
    assert!(
        matches!(&err, ApplyError::UnknownFile(n) if n == "b.db"),
        "{err:?}"
    );
    let err = fx.refuse(file_end("b.db", 0));
    assert!(matches!(&err, ApplyError::UnknownFile(_)), "{err:?}");
    // A finished file is not open any more.
    fx.ok(file_chunk("a.db", 0, &[7u8; 100]));
    fx.ok(file_end("a.db", 100));
    let err = fx.refuse(file_chunk("a.db", 100, b"late"));
    assert!(matches!(&err, ApplyError::UnknownFile(_)), "{err:?}");
}

#[test]
fn out_of_order_chunks_are_refused() {
    let mut fx = populated();
    let data = db_bytes(12288, 7);
    fx.ok(file_start("new.db", data.len() as u64, FileKind::Database));
    let err = fx.refuse(file_chunk("new.db", 4096, &data[4096..8192]));
    assert!(
        matches!(
            err,
            ApplyError::OutOfOrder {
                expected: 0,
                got: 4096,
                ..
            }
        ),
        "{err:?}"
    );
    fx.ok(file_chunk("new.db", 0, &data[..4096]));
    // A replay of the same chunk, one from the future, one overlapping.
    for (at, range) in [
        (0u64, 0..4096),
        (8192, 8192..12288),
        (4095, 4095..8191),
        (4097, 4097..8193),
    ] {
        let err = fx.refuse(file_chunk("new.db", at, &data[range]));
        assert!(
            matches!(err, ApplyError::OutOfOrder { expected: 4096, got, .. } if got == at),
            "{err:?}"
        );
    }
    fx.ok(file_chunk("new.db", 4096, &data[4096..8192]));
    fx.ok(file_chunk("new.db", 8192, &data[8192..]));
    fx.ok(file_end("new.db", data.len() as u64));
    assert_eq!(std::fs::read(fx.root().join("new.db")).expect("read"), data);
}

#[test]
fn a_bad_digest_is_refused_before_a_byte_is_written() {
    let mut fx = populated();
    let data = db_bytes(4096, 8);
    fx.ok(file_start("new.db", 4096, FileKind::Database));
    let good = blake3::hash(&data).as_bytes().to_vec();
    let mut flipped = good.clone();
    flipped[31] ^= 1;
    let mut corrupted = data.clone();
    corrupted[100] ^= 0x40;
    for (bytes, digest) in [
        (data.clone(), flipped.clone()),
        (data.clone(), Vec::new()),
        (data.clone(), good[..16].to_vec()),
        (data.clone(), vec![0u8; 32]),
        (corrupted, good.clone()), // flipped in transit
    ] {
        let err = fx.refuse(file_chunk_with_digest("new.db", 0, &bytes, digest));
        assert!(
            matches!(&err, ApplyError::Digest { what } if what.contains("new.db")),
            "{err:?}"
        );
        assert!(err.to_string().contains("blake3 mismatch"), "{err}");
    }
    fx.ok(file_chunk("new.db", 0, &data));
    fx.ok(file_end("new.db", 4096));

    // The same for the log.
    let (file, at, recs) = next_records(&fx.m, 30, 3);
    let mut bad = recs.clone();
    bad[20] ^= 1;
    let err = fx.refuse(log_chunk_full(file, at, &recs, flipped, LOG_FILE_SIZE));
    assert!(
        matches!(&err, ApplyError::Digest { what } if what.contains("log chunk")),
        "{err:?}"
    );
    let err = fx.refuse(log_chunk_full(
        file,
        at,
        &bad,
        blake3::hash(&recs).as_bytes().to_vec(),
        LOG_FILE_SIZE,
    ));
    assert!(matches!(err, ApplyError::Digest { .. }), "{err:?}");
    fx.ok(log_chunk(file, at, &recs));
}

#[test]
fn log_that_does_not_continue_the_standby_log_is_refused() {
    let mut fx = populated();
    let end = fx.m.tail().written;
    let last = fx.m.tail().last_record.expect("log");
    let (recs, _) = records(end.offset, last, 40, 2);
    let (next_img, _) = log_file(last, 50, 2);
    let cases = [
        (LogPosition::new(1, end.offset + 12), recs.clone()), // a hole
        (LogPosition::new(1, end.offset - 1), recs.clone()),  // overlapping
        (LogPosition::new(1, 0), recs.clone()),               // from the start again
        (LogPosition::new(3, 0), next_img.clone()),           // a whole file skipped
        (LogPosition::new(2, 28), recs.clone()),              // the next file, not at its start
        (LogPosition::new(0, 0), next_img.clone()),
        (LogPosition::new(u32::MAX, 0), next_img.clone()),
    ];
    for (at, data) in cases {
        let err = fx.refuse(log_chunk(at.file, at.offset, &data));
        assert!(
            matches!(err, ApplyError::LogGap { expected, got } if expected == end && got == at),
            "{at}: {err:?}"
        );
        assert!(err.to_string().contains("does not continue"), "{err}");
    }
    fx.ok(log_chunk(1, end.offset, &recs));
}

#[test]
fn log_bytes_that_are_not_valid_records_are_refused() {
    let mut fx = populated();
    let end = fx.m.tail().written;
    let last = fx.m.tail().last_record.expect("log");
    let (good, _) = records(end.offset, last, 60, 3);
    let first_len = synth::record(last, &body(60)).len();

    let mut bad_checksum = good.clone();
    bad_checksum[8] ^= 1;
    let mut torn = good.clone();
    for b in &mut torn[first_len + 14..first_len + 20] {
        *b = 0;
    }
    let (wrong_prev, _) = records(end.offset, last + 4, 60, 3);
    let mut short_len = good.clone();
    short_len[4..8].copy_from_slice(&8u32.to_le_bytes());
    let mut zero_len = good.clone();
    zero_len[4..8].copy_from_slice(&0u32.to_le_bytes());
    let mut huge_len = good.clone();
    huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", db_bytes(300, 11)),
        ("bad checksum", bad_checksum),
        ("torn record", torn),
        ("prev does not point at the last record", wrong_prev),
        ("record cut short", good[..good.len() - 1].to_vec()),
        ("a header and nothing else", good[..12].to_vec()),
        ("length shorter than a header", short_len),
        ("zero length", zero_len),
        ("length past 4 GiB", huge_len),
        (
            "good records then zeros",
            [good.clone(), vec![0u8; 64]].concat(),
        ),
        ("empty", Vec::new()),
    ];
    for (what, data) in cases {
        let err = fx.refuse(log_chunk(end.file, end.offset, &data));
        assert!(
            matches!(err, ApplyError::InvalidLog { at, .. } if at == end),
            "{what}: {err:?}"
        );
        assert!(
            err.to_string()
                .contains("not a run of complete, verified records"),
            "{what}: {err}"
        );
    }
    // A declared log file size no log file can have.
    let err = fx.refuse(log_chunk_full(
        end.file,
        end.offset,
        &good,
        blake3::hash(&good).as_bytes().to_vec(),
        1 << 33,
    ));
    assert!(matches!(err, ApplyError::InvalidLog { .. }), "{err:?}");

    // The first chunk of the next file must start with a persist record
    // that points back at this file's last record.
    let (img, _) = log_file(last, 70, 2);
    let (not_persist, _) = records(0, last, 70, 2);
    let (wrong_back_pointer, _) = log_file(last + 1, 70, 2);
    let mut wrong_magic = img.clone();
    wrong_magic[12] ^= 1;
    for (what, data) in [
        ("no persist record", not_persist),
        ("wrong back pointer", wrong_back_pointer),
        ("wrong magic", wrong_magic),
    ] {
        let err = fx.refuse(log_chunk(2, 0, &data));
        assert!(
            matches!(err, ApplyError::InvalidLog { at, .. } if at == LogPosition::new(2, 0)),
            "{what}: {err:?}"
        );
    }
    fx.ok(log_chunk(end.file, end.offset, &good));
    let (img, _) = log_file(fx.m.tail().last_record.expect("log"), 70, 2);
    fx.ok(log_chunk(2, 0, &img));
    fx.m.sync().expect("sync");
    assert_eq!(fx.m.tail().durable, LogPosition::new(2, img.len() as u32));
}
