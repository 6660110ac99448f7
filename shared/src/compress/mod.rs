//! Compression of what the primary ships (base-copy file chunks and log
//! chunks), for links slower than the disks at either end.
//!
//! Negotiated per session: the standby lists in its Hello the encodings it
//! can decode, the primary names in its Welcome the one it will use (or
//! none: an old standby, or `--compression off` on either side, gets every
//! chunk as it is). Then each chunk is encoded on its own: its zstd form is
//! kept only if it saves at least 1/8, so incompressible pages travel as
//! they are and cost the standby no decoding. `blake3` stays over the
//! original bytes, so the standby's digest check covers the decoder too.
//!
//! A large chunk is first judged by a sample: its zstd attempt is made only
//! if a [`SAMPLE`]-byte slice of it saves 1/8. Pages that will not compress
//! (random values, already compressed data) then cost a sixteenth of an
//! attempt instead of a whole one: measured, the failed attempts were a third
//! of the primary's CPU in a base copy of such pages (bench section 1). And
//! once [`MISSES_BEFORE_BACKOFF`] samples in a row of one file have not
//! compressed, only every [`SAMPLE_EVERY`]th chunk of it is sampled until
//! one does (the samples were still 5 % of the primary's CPU on such a file).
//!
//! The zstd level follows the link, judged by the session's send queue: a
//! full queue means the network is the bottleneck (spend more CPU, send
//! fewer bytes), an empty one that the sender is (spend less). The decoder
//! trusts nothing: the declared size is bounded by [`MAX_CHUNK`] before any
//! allocation, and a frame that decodes to anything but exactly that size
//! is refused before a byte is written.
//!
//! The primary calls [`Encoder::encode_kind`] once per message it sends,
//! the standby [`decode_kind`] once per message it applies.

use crate::wire::{primary_message::Kind, ChunkEncoding};
use crate::MAX_CHUNK;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// The name of zstd in Hello and Welcome.
pub const ZSTD: &str = "zstd";
/// The level a session starts at: zstd's default, several hundred MB/s of
/// input per core and most of the ratio of the higher levels on BDB pages.
pub const START_LEVEL: i32 = 3;
/// Lowest level the encoder falls to when it is the bottleneck.
pub const MIN_LEVEL: i32 = 1;
/// Highest level it climbs to while the link is: beyond this zstd's speed
/// falls off faster than the ratio improves.
pub const MAX_LEVEL: i32 = 9;
/// Chunks smaller than this are sent as they are: a frame header and the
/// decoder's call would eat what little they save.
const MIN_COMPRESS: usize = 256;
/// Bytes of a chunk compressed to judge whether the whole is worth trying;
/// only chunks of at least 4 samples are judged this way.
pub const SAMPLE: usize = 64 << 10;
/// Samples in a row of one file that must fail before the file's chunks
/// are sampled only now and then: a few, so a file's compressible start
/// (metadata, empty pages) or a stretch of random values does not decide.
pub const MISSES_BEFORE_BACKOFF: u32 = 4;
/// Then one chunk in this many is sampled; a sample that compresses brings
/// back sampling every chunk. The cost: up to this many chunks less one
/// (15 MiB) sent as they are where a file turns compressible.
pub const SAMPLE_EVERY: u32 = 16;

/// The `--compression` setting of either daemon (a flag through clap, a
/// key through serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Offer (standby) or use (primary) zstd when the peer agrees.
    #[default]
    Auto,
    /// Never: every chunk is sent as it is.
    Off,
}

impl Compression {
    /// What a standby with this setting offers in its Hello.
    pub fn offers(self) -> Vec<String> {
        match self {
            Self::Auto => vec![ZSTD.to_owned()],
            Self::Off => Vec::new(),
        }
    }

    /// The encoding a primary with this setting uses with a standby that
    /// offered `accepted` ("" for none), for the Welcome.
    pub fn choose(self, accepted: &[String]) -> &'static str {
        match self {
            Self::Auto if accepted.iter().any(|e| e == ZSTD) => ZSTD,
            _ => "",
        }
    }
}

/// Bytes before and after encoding, for the metrics (shared by every
/// session of a primary).
#[derive(Debug, Default)]
pub struct WireStats {
    /// Chunk payload bytes as read from disk.
    pub raw_bytes: AtomicU64,
    /// The same chunks' payload bytes as sent.
    pub sent_bytes: AtomicU64,
    /// Chunks sent zstd-encoded.
    pub zstd_chunks: AtomicU64,
    /// Chunks sent as they are.
    pub plain_chunks: AtomicU64,
    /// zstd runs over a whole chunk (samples not counted): with
    /// `zstd_chunks`, how many were wasted.
    pub zstd_attempts: AtomicU64,
    /// Samples taken (chunks of at least four samples, judged by one).
    pub zstd_samples: AtomicU64,
}

/// How full the session's send queue is when a chunk is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueFill {
    Empty,
    Partly,
    Full,
}

impl QueueFill {
    /// From a bounded channel's free slots and its size.
    pub fn of(free: usize, size: usize) -> Self {
        if free == 0 {
            Self::Full
        } else if free >= size {
            Self::Empty
        } else {
            Self::Partly
        }
    }
}

/// One session's encoder: whether the standby agreed to zstd, and the
/// level the link currently deserves.
#[derive(Debug)]
pub struct Encoder {
    zstd: bool,
    level: AtomicI32,
    stats: Arc<WireStats>,
    /// Sampling of the base copy's file chunks (one thread sends them; log
    /// chunks sample every chunk).
    file_samples: Backoff,
}

/// Which chunks of the file being sent are sampled: after
/// [`MISSES_BEFORE_BACKOFF`] failed samples in a row, one in
/// [`SAMPLE_EVERY`]; every one again after a sample compresses, and from
/// each FileStart on.
#[derive(Debug, Default)]
struct Backoff {
    /// Samples in a row of this file that did not compress.
    misses: AtomicU32,
    /// Chunks to send as they are before the next sample.
    skip: AtomicU32,
}

impl Backoff {
    fn new_file(&self) {
        self.misses.store(0, Ordering::Relaxed);
        self.skip.store(0, Ordering::Relaxed);
    }

    /// Whether this chunk is sampled (false: it goes as it is, as the
    /// file's last samples did).
    fn sample_this(&self) -> bool {
        self.skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1))
            .is_err()
    }

    fn sampled(&self, compresses: bool) {
        if compresses {
            self.misses.store(0, Ordering::Relaxed);
            return;
        }
        let misses = self.misses.fetch_add(1, Ordering::Relaxed) + 1;
        if misses >= MISSES_BEFORE_BACKOFF {
            self.skip.store(SAMPLE_EVERY - 1, Ordering::Relaxed);
        }
    }
}

/// A chunk payload ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub encoding: ChunkEncoding,
    pub data: Bytes,
    /// The original size when encoded, 0 when sent as it is.
    pub raw_len: u64,
}

impl Encoder {
    /// `encoding` is what the Welcome named ("" = send everything as it is).
    pub fn new(encoding: &str, stats: Arc<WireStats>) -> Self {
        Self {
            zstd: encoding == ZSTD,
            level: AtomicI32::new(START_LEVEL),
            stats,
            file_samples: Backoff::default(),
        }
    }

    pub fn level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }

    /// Moves the level one step toward what the link deserves.
    pub fn adapt(&self, fill: QueueFill) {
        let step = match fill {
            QueueFill::Full => 1,
            QueueFill::Empty => -1,
            QueueFill::Partly => return,
        };
        let _ = self
            .level
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some((l + step).clamp(MIN_LEVEL, MAX_LEVEL))
            });
    }

    /// Encodes one payload: zstd when agreed and it saves at least 1/8,
    /// otherwise the bytes as they are.
    pub fn encode(&self, data: Bytes) -> Encoded {
        self.encode_sampled(data, None)
    }

    /// As [`Self::encode`]; `backoff`: the sampling state of the file the
    /// chunk is part of.
    fn encode_sampled(&self, data: Bytes, backoff: Option<&Backoff>) -> Encoded {
        let raw = data.len() as u64;
        let out = if self.zstd && data.len() >= MIN_COMPRESS && self.worth_trying(&data, backoff) {
            self.stats.zstd_attempts.fetch_add(1, Ordering::Relaxed);
            match zstd::bulk::compress(&data, self.level()) {
                Ok(z) if saves_enough(z.len(), data.len()) => Encoded {
                    encoding: ChunkEncoding::Zstd,
                    data: Bytes::from(z),
                    raw_len: raw,
                },
                // Not worth it, or (never seen) zstd failed: send as is.
                _ => plain(data),
            }
        } else {
            plain(data)
        };
        let s = &self.stats;
        s.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        s.sent_bytes
            .fetch_add(out.data.len() as u64, Ordering::Relaxed);
        match out.encoding {
            ChunkEncoding::Zstd => &s.zstd_chunks,
            ChunkEncoding::None => &s.plain_chunks,
        }
        .fetch_add(1, Ordering::Relaxed);
        out
    }

    /// Whether a zstd attempt on `data` may save 1/8: a large chunk's
    /// sample, from its middle (a database file's first pages, its metadata
    /// and empty pages, say little about the rest), must.
    fn worth_trying(&self, data: &[u8], backoff: Option<&Backoff>) -> bool {
        if data.len() < 4 * SAMPLE {
            return true;
        }
        if backoff.is_some_and(|b| !b.sample_this()) {
            return false;
        }
        self.stats.zstd_samples.fetch_add(1, Ordering::Relaxed);
        let compresses = Self::sample_compresses(data);
        if let Some(b) = backoff {
            b.sampled(compresses);
        }
        compresses
    }

    /// Whether the [`SAMPLE`] bytes in the middle of `data` save 1/8 at
    /// zstd's lowest level.
    fn sample_compresses(data: &[u8]) -> bool {
        let from = (data.len() / 2 - SAMPLE / 2) & !4095;
        let sample = &data[from..from + SAMPLE];
        // At the lowest level, whatever the link deserves: the question is
        // only whether the bytes compress at all. One compressor per thread:
        // making a zstd context per call cost as much as the sample.
        thread_local! {
            static SAMPLER: std::cell::RefCell<(Option<zstd::bulk::Compressor<'static>>, Vec<u8>)> =
                const { std::cell::RefCell::new((None, Vec::new())) };
        }
        SAMPLER.with_borrow_mut(|(compressor, out)| {
            if compressor.is_none() {
                *compressor = zstd::bulk::Compressor::new(MIN_LEVEL).ok();
            }
            let Some(c) = compressor.as_mut() else {
                return true; // no compressor: try the whole chunk, as before
            };
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(SAMPLE));
            matches!(c.compress_to_buffer(sample, out), Ok(n) if saves_enough(n, SAMPLE))
        })
    }

    /// Encodes the payload of a file or log chunk; other messages pass.
    pub fn encode_kind(&self, kind: Kind, fill: QueueFill) -> Kind {
        if matches!(kind, Kind::FileStart(_)) {
            self.file_samples.new_file();
        }
        if !matches!(kind, Kind::FileChunk(_) | Kind::LogChunk(_)) {
            return kind;
        }
        if self.zstd {
            self.adapt(fill);
        }
        match kind {
            Kind::FileChunk(mut c) => {
                let e = self.encode_sampled(std::mem::take(&mut c.data), Some(&self.file_samples));
                c.encoding = e.encoding as i32;
                c.data = e.data;
                c.raw_len = e.raw_len;
                Kind::FileChunk(c)
            }
            Kind::LogChunk(mut c) => {
                let e = self.encode(std::mem::take(&mut c.data));
                c.encoding = e.encoding as i32;
                c.data = e.data;
                c.raw_len = e.raw_len;
                Kind::LogChunk(c)
            }
            other => other,
        }
    }
}

/// zstd's form of `raw` bytes is kept only if it saves at least 1/8.
fn saves_enough(encoded: usize, raw: usize) -> bool {
    encoded <= raw - raw / 8
}

fn plain(data: Bytes) -> Encoded {
    Encoded {
        encoding: ChunkEncoding::None,
        data,
        raw_len: 0,
    }
}

/// Why a chunk could not be decoded. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown chunk encoding {0}")]
    Unknown(i32),
    #[error("a zstd-encoded chunk, but this standby did not offer zstd (--compression off)")]
    NotOffered,
    #[error("a zstd-encoded chunk declares {declared} original bytes, over the {MAX_CHUNK}-byte chunk limit")]
    TooLarge { declared: u64 },
    #[error("a zstd-encoded chunk does not decode to its declared {declared} bytes: {why}")]
    Corrupt { declared: u64, why: String },
    #[error("a zstd-encoded chunk declares {declared} original bytes but decodes to {got}")]
    SizeMismatch { declared: u64, got: u64 },
}

/// Decodes one payload. `accepted`: whether this side offered zstd.
pub fn decode(
    encoding: i32,
    data: Bytes,
    raw_len: u64,
    accepted: bool,
) -> Result<Bytes, DecodeError> {
    match ChunkEncoding::try_from(encoding) {
        Ok(ChunkEncoding::None) => Ok(data),
        Ok(ChunkEncoding::Zstd) => {
            if !accepted {
                return Err(DecodeError::NotOffered);
            }
            if raw_len > MAX_CHUNK as u64 {
                return Err(DecodeError::TooLarge { declared: raw_len });
            }
            // The capacity is the bound: a frame that would decode to more
            // (a bomb, or a size lie) fails inside zstd, never allocating
            // beyond it.
            let out = zstd::bulk::decompress(&data, raw_len as usize).map_err(|e| {
                DecodeError::Corrupt {
                    declared: raw_len,
                    why: e.to_string(),
                }
            })?;
            if out.len() as u64 != raw_len {
                return Err(DecodeError::SizeMismatch {
                    declared: raw_len,
                    got: out.len() as u64,
                });
            }
            Ok(Bytes::from(out))
        }
        Err(_) => Err(DecodeError::Unknown(encoding)),
    }
}

/// Decodes the payload of a file or log chunk in place; other messages pass.
pub fn decode_kind(kind: Kind, accepted: bool) -> Result<Kind, DecodeError> {
    Ok(match kind {
        Kind::FileChunk(mut c) => {
            c.data = decode(c.encoding, std::mem::take(&mut c.data), c.raw_len, accepted)?;
            c.encoding = ChunkEncoding::None as i32;
            c.raw_len = 0;
            Kind::FileChunk(c)
        }
        Kind::LogChunk(mut c) => {
            c.data = decode(c.encoding, std::mem::take(&mut c.data), c.raw_len, accepted)?;
            c.encoding = ChunkEncoding::None as i32;
            c.raw_len = 0;
            Kind::LogChunk(c)
        }
        other => other,
    })
}

#[cfg(test)]
mod tests;
