//! The per-chunk choice, the round trip, the digest over original bytes,
//! and the decoder refusing what it must not trust.

use super::*;
use crate::wire::{FileChunk, LogChunk};

/// Page-like bytes: records of a key and a repetitive value, as a BDB
/// btree leaf holds them.
fn compressible(len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut i = 0u32;
    while v.len() < len {
        v.extend_from_slice(format!("key-{i:08} value of record {i} ....").as_bytes());
        i += 1;
    }
    v.truncate(len);
    Bytes::from(v)
}

/// Bytes no compressor shrinks (a xorshift stream).
fn incompressible(len: usize) -> Bytes {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn encoder(encoding: &str) -> (Encoder, Arc<WireStats>) {
    let stats = Arc::new(WireStats::default());
    (Encoder::new(encoding, stats.clone()), stats)
}

#[test]
fn compressible_chunks_are_zstd_and_round_trip() {
    let (enc, stats) = encoder(ZSTD);
    let data = compressible(64 * 1024);
    let e = enc.encode(data.clone());
    assert_eq!(e.encoding, ChunkEncoding::Zstd);
    assert_eq!(e.raw_len, data.len() as u64);
    assert!(e.data.len() < data.len() / 4, "{} bytes", e.data.len());
    let back = decode(e.encoding as i32, e.data.clone(), e.raw_len, true).unwrap();
    assert_eq!(back, data);
    assert_eq!(stats.raw_bytes.load(Ordering::Relaxed), data.len() as u64);
    assert_eq!(
        stats.sent_bytes.load(Ordering::Relaxed),
        e.data.len() as u64
    );
    assert_eq!(stats.zstd_chunks.load(Ordering::Relaxed), 1);
}

#[test]
fn incompressible_and_tiny_chunks_go_as_they_are() {
    let (enc, stats) = encoder(ZSTD);
    let data = incompressible(64 * 1024);
    let e = enc.encode(data.clone());
    assert_eq!(e.encoding, ChunkEncoding::None);
    assert_eq!((e.data, e.raw_len), (data, 0));
    let tiny = compressible(100);
    assert_eq!(enc.encode(tiny.clone()).data, tiny);
    assert_eq!(stats.plain_chunks.load(Ordering::Relaxed), 2);
}

#[test]
fn a_chunk_saving_less_than_an_eighth_goes_as_it_is() {
    let (enc, _) = encoder(ZSTD);
    // 7/8 random, 1/8 zeros: zstd saves about 1/8 minus its overhead.
    let mut v = incompressible(56 * 1024).to_vec();
    v.extend(std::iter::repeat_n(0u8, 8 * 1024));
    assert_eq!(enc.encode(Bytes::from(v)).encoding, ChunkEncoding::None);
    let mut v = incompressible(48 * 1024).to_vec();
    v.extend(std::iter::repeat_n(0u8, 16 * 1024));
    assert_eq!(enc.encode(Bytes::from(v)).encoding, ChunkEncoding::Zstd);
}

#[test]
fn without_agreement_nothing_is_encoded() {
    let (enc, _) = encoder("");
    let data = compressible(64 * 1024);
    assert_eq!(enc.encode(data.clone()).data, data);
    assert_eq!(Compression::Auto.choose(&[]), "");
    assert_eq!(Compression::Auto.choose(&["lz4".into()]), "");
    assert_eq!(Compression::Auto.choose(&Compression::Auto.offers()), ZSTD);
    assert_eq!(Compression::Off.choose(&Compression::Auto.offers()), "");
    assert!(Compression::Off.offers().is_empty());
    use clap::ValueEnum;
    assert_eq!(Compression::from_str("off", false), Ok(Compression::Off));
    assert!(Compression::from_str("fast", false).is_err());
}

#[test]
fn blake3_travels_over_the_original_bytes() {
    let (enc, _) = encoder(ZSTD);
    let data = compressible(128 * 1024);
    let digest = Bytes::copy_from_slice(blake3::hash(&data).as_bytes());
    let kind = Kind::LogChunk(LogChunk {
        file: 1,
        offset: 0,
        data: data.clone(),
        blake3: digest.clone(),
        file_size: 10 << 20,
        ..Default::default()
    });
    let Kind::LogChunk(sent) = enc.encode_kind(kind, QueueFill::Partly) else {
        panic!("not a log chunk")
    };
    assert_eq!(sent.encoding, ChunkEncoding::Zstd as i32);
    assert_eq!(sent.blake3, digest, "the digest is not recomputed");
    assert_ne!(blake3::hash(&sent.data).as_bytes()[..], digest[..]);
    let Ok(Kind::LogChunk(got)) = decode_kind(Kind::LogChunk(sent), true) else {
        panic!("decode failed")
    };
    assert_eq!(got.data, data);
    assert_eq!(blake3::hash(&got.data).as_bytes()[..], digest[..]);
    assert_eq!((got.encoding, got.raw_len), (0, 0));
}

fn zstd_file_chunk(data: Bytes, raw_len: u64) -> Kind {
    Kind::FileChunk(FileChunk {
        name: "a.db".into(),
        offset: 0,
        data,
        blake3: Bytes::new(),
        encoding: ChunkEncoding::Zstd as i32,
        raw_len,
        ..Default::default()
    })
}

#[test]
fn a_corrupted_compressed_chunk_is_refused() {
    let (enc, _) = encoder(ZSTD);
    let data = compressible(64 * 1024);
    let e = enc.encode(data);
    let mut bad = e.data.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    bad.truncate(bad.len() - 3);
    let err = decode_kind(zstd_file_chunk(Bytes::from(bad), e.raw_len), true).unwrap_err();
    assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("does not decode"), "{err}");
}

#[test]
fn size_lies_and_bombs_are_refused() {
    let (enc, _) = encoder(ZSTD);
    let data = compressible(64 * 1024);
    let e = enc.encode(data.clone());
    // Declares fewer bytes than the frame holds: a bomb is this, bigger.
    let err = decode(e.encoding as i32, e.data.clone(), e.raw_len - 1, true).unwrap_err();
    assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
    // Declares more than it holds.
    let err = decode(e.encoding as i32, e.data.clone(), e.raw_len + 1, true).unwrap_err();
    assert!(matches!(err, DecodeError::SizeMismatch { .. }), "{err}");
    // 64 MiB of zeros squeezed into a few KiB, declared as what it is:
    // refused before a byte is allocated for it.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let err = decode_kind(zstd_file_chunk(Bytes::from(bomb.clone()), 64 << 20), true).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("over the"), "{err}");
    // The same bomb declared within the limit.
    let err = decode_kind(zstd_file_chunk(Bytes::from(bomb), 4096), true).unwrap_err();
    assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
}

#[test]
fn unknown_or_unoffered_encodings_are_refused() {
    let data = compressible(4096);
    let err = decode(7, data.clone(), 4096, true).unwrap_err();
    assert!(matches!(err, DecodeError::Unknown(7)), "{err}");
    let (enc, _) = encoder(ZSTD);
    let e = enc.encode(data);
    let err = decode(e.encoding as i32, e.data, e.raw_len, false).unwrap_err();
    assert!(matches!(err, DecodeError::NotOffered), "{err}");
}

#[test]
fn the_level_follows_the_queue() {
    let (enc, _) = encoder(ZSTD);
    assert_eq!(enc.level(), START_LEVEL);
    for _ in 0..20 {
        enc.adapt(QueueFill::Full);
    }
    assert_eq!(enc.level(), MAX_LEVEL);
    enc.adapt(QueueFill::Partly);
    assert_eq!(enc.level(), MAX_LEVEL);
    for _ in 0..20 {
        enc.adapt(QueueFill::Empty);
    }
    assert_eq!(enc.level(), MIN_LEVEL);
    assert_eq!(QueueFill::of(0, 16), QueueFill::Full);
    assert_eq!(QueueFill::of(16, 16), QueueFill::Empty);
    assert_eq!(QueueFill::of(3, 16), QueueFill::Partly);
}

/// A chunk whose sample will not compress costs no whole attempt, and is
/// sent as it is; one whose sample compresses is tried whole, as before.
#[test]
fn a_chunk_whose_sample_will_not_compress_is_not_tried_whole() {
    let (enc, stats) = encoder(ZSTD);
    let big = 16 * SAMPLE;
    let e = enc.encode(incompressible(big));
    assert_eq!(e.encoding, ChunkEncoding::None);
    assert_eq!(e.data.len(), big);
    assert_eq!(stats.zstd_attempts.load(Ordering::Relaxed), 0);

    let data = compressible(big);
    let e = enc.encode(data.clone());
    assert_eq!(e.encoding, ChunkEncoding::Zstd);
    assert_eq!(stats.zstd_attempts.load(Ordering::Relaxed), 1);
    assert_eq!(
        decode(e.encoding as i32, e.data, e.raw_len, true).unwrap(),
        data
    );

    // Below four samples, every chunk is tried whole.
    let e = enc.encode(incompressible(2 * SAMPLE));
    assert_eq!(e.encoding, ChunkEncoding::None);
    assert_eq!(stats.zstd_attempts.load(Ordering::Relaxed), 2);
    assert_eq!(stats.plain_chunks.load(Ordering::Relaxed), 2);
}

fn file_chunk(data: Bytes) -> Kind {
    Kind::FileChunk(FileChunk {
        name: "data.db".into(),
        data,
        ..Default::default()
    })
}

fn file_start() -> Kind {
    Kind::FileStart(crate::wire::FileStart {
        name: "data.db".into(),
        ..Default::default()
    })
}

fn sent_as(kind: Kind) -> ChunkEncoding {
    match kind {
        Kind::FileChunk(c) => ChunkEncoding::try_from(c.encoding).unwrap(),
        Kind::LogChunk(c) => ChunkEncoding::try_from(c.encoding).unwrap(),
        other => panic!("not a chunk: {other:?}"),
    }
}

/// After a few samples in a row of one file fail, only every
/// SAMPLE_EVERY-th chunk of it is sampled; a sample that compresses brings
/// back sampling every chunk, and so does the next file. Log chunks are
/// always sampled.
#[test]
fn a_file_whose_samples_keep_failing_is_sampled_now_and_then() {
    let (enc, stats) = encoder(ZSTD);
    let samples = || stats.zstd_samples.load(Ordering::Relaxed);
    let send = |data: Bytes| sent_as(enc.encode_kind(file_chunk(data), QueueFill::Partly));
    let big = 16 * SAMPLE;
    enc.encode_kind(file_start(), QueueFill::Partly);
    for n in 1..=MISSES_BEFORE_BACKOFF {
        assert_eq!(send(incompressible(big)), ChunkEncoding::None);
        assert_eq!(
            samples(),
            n as u64,
            "the first samples of a file are all taken"
        );
    }
    // Backed off: the next SAMPLE_EVERY - 1 chunks go unsampled, even a
    // compressible one (the price of the backoff), then one is sampled.
    assert_eq!(send(compressible(big)), ChunkEncoding::None);
    for _ in 2..SAMPLE_EVERY {
        assert_eq!(send(incompressible(big)), ChunkEncoding::None);
    }
    let before = samples();
    assert_eq!(before, MISSES_BEFORE_BACKOFF as u64);
    assert_eq!(send(incompressible(big)), ChunkEncoding::None);
    assert_eq!(
        samples(),
        before + 1,
        "one chunk in SAMPLE_EVERY is sampled"
    );
    // Still failing: backed off again at once.
    assert_eq!(send(compressible(big)), ChunkEncoding::None);
    assert_eq!(samples(), before + 1);
    // Log chunks are not affected.
    let log = Kind::LogChunk(LogChunk {
        data: compressible(big),
        ..Default::default()
    });
    assert_eq!(
        sent_as(enc.encode_kind(log, QueueFill::Partly)),
        ChunkEncoding::Zstd
    );
    // A new file samples every chunk again.
    enc.encode_kind(file_start(), QueueFill::Partly);
    let at = samples();
    assert_eq!(send(compressible(big)), ChunkEncoding::Zstd);
    assert_eq!(samples(), at + 1);
    // A compressing sample ends a backoff's count: misses start again.
    for _ in 1..MISSES_BEFORE_BACKOFF {
        assert_eq!(send(incompressible(big)), ChunkEncoding::None);
    }
    assert_eq!(send(compressible(big)), ChunkEncoding::Zstd);
    for _ in 1..MISSES_BEFORE_BACKOFF {
        assert_eq!(send(incompressible(big)), ChunkEncoding::None);
    }
    assert_eq!(
        send(compressible(big)),
        ChunkEncoding::Zstd,
        "not backed off yet"
    );
}
