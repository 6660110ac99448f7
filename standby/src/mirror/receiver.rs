//! The file receiver: database files (and `DB_CONFIG`) arrive in checked
//! chunks under `.tandem/incoming/` and are placed, complete and fsynced, in
//! a destination root: the mirror itself, or the staging area of a rebase or
//! a replacement base. It never decides which: the mirror says where.
//!
//! Rules it enforces:
//! - a chunk is written only after its blake3 digest matches, in order, and
//!   within the size the FileStart declared. The digest is either blake3 of
//!   the chunk or (`pages_blake3`) blake3 of its pages' blake3, which are the
//!   page digests recorded for the scrub: each byte is hashed once;
//! - a file name is accepted only if it stays inside the directory (checked
//!   at FileStart against the mirror and again when placed, against the
//!   destination: a symlink may have appeared meanwhile);
//! - a file appears under its name only when complete and fsynced, then its
//!   directory is fsynced. Its bytes are written while the next chunks
//!   arrive, by a thread of its own and around the page cache where the file
//!   system allows ([`crate::mirror::file_writer`]), so that fsync finds
//!   little left to write.

use crate::mirror::apply_error::{ApplyError, MAX_FILE_SIZE};
use crate::mirror::dirs::create_dirs_durably;
use crate::mirror::file_writer::FileWriter;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tandem_shared::durable::fsync_dir;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::ioerror::io_err;
use tandem_shared::logfile::parse_log_file_name;
use tandem_shared::pages::{page_digests, page_hashes, PAGE_DIGEST_LEN};
use tandem_shared::wire::{FileChunk, FileEnd, FileKind, FileSame, FileStart};
use tandem_shared::wirepath;

/// The page size digests are kept in when a FileStart names none (the
/// scrub's size for files that are not databases).
const DEFAULT_PAGE_SIZE: u32 = 4096;

/// A database file being received.
#[derive(Debug)]
struct Incoming {
    name: String,
    temp: PathBuf,
    writer: FileWriter,
    size: u64,
    written: u64,
    pages: PageDigester,
}

/// A file placed by [`FileReceiver::end`]: its name, and the digests of its
/// pages as written (computed from the bytes in memory, so recording them
/// for the scrub does not read the file again).
#[derive(Debug)]
pub struct Placed {
    pub name: String,
    pub page_size: u32,
    pub size: u64,
    pub page_digests: Vec<u8>,
}

/// Page digests of a file as its bytes arrive, page by page as
/// `scrub::digests::digest_file` computes them from the file (16 bytes of
/// blake3 per page, a short last page digested as it is).
#[derive(Debug)]
struct PageDigester {
    page: usize,
    partial: Vec<u8>,
    digests: Vec<u8>,
}

impl PageDigester {
    fn new(page_size: u32) -> Self {
        Self {
            page: page_size.max(1) as usize,
            partial: Vec::new(),
            digests: Vec::new(),
        }
    }

    fn add(&mut self, mut data: &[u8]) {
        if !self.partial.is_empty() {
            let take = (self.page - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < self.page {
                return;
            }
            self.digests
                .extend_from_slice(&page_digests(&self.partial, self.page));
            self.partial.clear();
        }
        let whole = data.len() - data.len() % self.page;
        self.digests
            .extend_from_slice(&page_digests(&data[..whole], self.page));
        self.partial.extend_from_slice(&data[whole..]);
    }

    /// As [`Self::add`], for bytes whose whole pages' blake3 (32 bytes each,
    /// in `hashes`) are already known: they are not hashed again.
    fn add_hashed(&mut self, data: &[u8], hashes: &[u8]) {
        if !self.partial.is_empty() {
            return self.add(data); // not on a page boundary: never sent so
        }
        let whole = data.len() / self.page;
        for h in hashes.chunks_exact(32).take(whole) {
            self.digests.extend_from_slice(&h[..PAGE_DIGEST_LEN]);
        }
        self.partial.extend_from_slice(&data[whole * self.page..]);
    }

    fn finish(mut self) -> Vec<u8> {
        if !self.partial.is_empty() {
            self.digests
                .extend_from_slice(&page_digests(&self.partial, self.page));
        }
        self.digests
    }
}

impl Incoming {
    /// Writes `data` at the next offset and starts its way to disk.
    fn append(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        self.pages.add(data);
        self.write(data)
    }

    /// [`Self::append`] for checked bytes whose page hashes are known.
    fn append_hashed(&mut self, data: &[u8], hashes: &[u8]) -> Result<(), ApplyError> {
        self.pages.add_hashed(data, hashes);
        self.write(data)
    }

    fn write(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        self.writer
            .write(data)
            .map_err(io_err(format!("writing {}", self.name)))?;
        self.written += data.len() as u64;
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct FileReceiver {
    incoming: Option<Incoming>,
}

impl FileReceiver {
    /// Forgets a file being received (the primary sends it again from its
    /// start) and removes its partial copy.
    pub fn forget(&mut self) {
        if let Some(inc) = self.incoming.take() {
            let temp = inc.temp.clone();
            drop(inc); // its writing thread stops first
            let _ = std::fs::remove_file(&temp);
        }
    }

    /// Checks a FileStart against the mirror at `root` and opens the
    /// partial copy under `scratch`.
    pub fn start(&mut self, root: &Path, scratch: &Path, f: FileStart) -> Result<(), ApplyError> {
        if let Some(open) = &self.incoming {
            return Err(ApplyError::Protocol(format!(
                "FileStart for {} while {} is incomplete",
                f.name, open.name
            )));
        }
        let path = wirepath::resolve_under(root, &f.name)?;
        let kind = FileKind::try_from(f.kind)
            .map_err(|_| ApplyError::Protocol(format!("unknown file kind {}", f.kind)))?;
        let leaf = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let ok_kind = match kind {
            FileKind::Config => f.name == DB_CONFIG,
            FileKind::Database => {
                leaf != DB_CONFIG
                    && parse_log_file_name(leaf).is_none()
                    && !tandem_shared::envlayout::is_region_file(leaf)
            }
        };
        if !ok_kind {
            return Err(ApplyError::Protocol(format!(
                "{} cannot be sent as a {:?} file",
                f.name, kind
            )));
        }
        if f.size > MAX_FILE_SIZE {
            return Err(ApplyError::TooLarge {
                name: f.name,
                size: f.size,
            });
        }
        let temp = scratch.join(&blake3::hash(f.name.as_bytes()).to_hex()[..24]);
        let writer = FileWriter::create(&temp, f.size)
            .map_err(io_err(format!("creating {}", temp.display())))?;
        self.incoming = Some(Incoming {
            name: f.name,
            temp,
            writer,
            size: f.size,
            written: 0,
            pages: PageDigester::new(if f.page_size == 0 {
                DEFAULT_PAGE_SIZE
            } else {
                f.page_size
            }),
        });
        Ok(())
    }

    fn expect(&mut self, name: &str, offset: u64) -> Result<&mut Incoming, ApplyError> {
        let Some(inc) = self.incoming.as_mut().filter(|i| i.name == name) else {
            return Err(ApplyError::UnknownFile(name.to_owned()));
        };
        if offset != inc.written {
            return Err(ApplyError::OutOfOrder {
                name: name.to_owned(),
                expected: inc.written,
                got: offset,
            });
        }
        Ok(inc)
    }

    /// Writes a chunk sent over the network. Returns the bytes written.
    pub fn chunk(&mut self, c: FileChunk) -> Result<u64, ApplyError> {
        let inc = self.expect(&c.name, c.offset)?;
        let len = c.data.len() as u64;
        if c.offset + len > inc.size {
            return Err(ApplyError::PastDeclaredSize {
                name: c.name,
                offset: c.offset,
                len,
                size: inc.size,
            });
        }
        let corrupted = || ApplyError::Digest {
            what: format!("{} at offset {}", c.name, c.offset),
        };
        if c.pages_blake3.is_empty() {
            if blake3::hash(&c.data).as_bytes()[..] != c.blake3[..] {
                return Err(corrupted());
            }
            inc.append(&c.data)?;
            return Ok(len);
        }
        let page = inc.pages.page;
        if !c.blake3.is_empty() || !c.offset.is_multiple_of(page as u64) {
            return Err(ApplyError::Protocol(format!(
                "{} at offset {}: pages_blake3 only alone, on a page boundary ({page}-byte pages)",
                c.name, c.offset
            )));
        }
        let hashes = page_hashes(&c.data, page);
        if blake3::hash(&hashes).as_bytes()[..] != c.pages_blake3[..] {
            return Err(corrupted());
        }
        inc.append_hashed(&c.data, &hashes)?;
        Ok(len)
    }

    /// Copies a range the primary says is unchanged from the mirror's own
    /// file under `root` (a rebase), after `check` accepts the bytes (they
    /// must match the digests recorded when they were written: a page
    /// damaged at rest must not be carried into the new base). Returns the
    /// bytes copied.
    pub fn same(
        &mut self,
        root: &Path,
        f: FileSame,
        check: impl FnOnce(&str, u64, &[u8]) -> Result<(), String>,
    ) -> Result<u64, ApplyError> {
        let inc = self.expect(&f.name, f.offset)?;
        if f.offset.checked_add(f.len).is_none_or(|end| end > inc.size)
            || f.len > tandem_shared::MAX_CHUNK as u64 * 64
        {
            return Err(ApplyError::PastDeclaredSize {
                name: f.name,
                offset: f.offset,
                len: f.len,
                size: inc.size,
            });
        }
        let source = wirepath::resolve_under(root, &f.name)?;
        let mut buf = vec![0u8; f.len as usize];
        File::open(&source)
            .and_then(|src| src.read_exact_at(&mut buf, f.offset))
            .map_err(|e| {
                ApplyError::Protocol(format!(
                    "FileSame for {} [{}..+{}] is not in the standby's copy: {e}",
                    f.name, f.offset, f.len
                ))
            })?;
        check(&f.name, f.offset, &buf).map_err(ApplyError::Protocol)?;
        inc.append(&buf)?;
        Ok(f.len)
    }

    /// Ends a file: makes it durable and gives it its name under `dest`.
    /// Returns its name and page digests, for the caller to record.
    pub fn end(&mut self, e: FileEnd, dest: &Path) -> Result<Placed, ApplyError> {
        let Some(inc) = self.incoming.take_if(|i| i.name == e.name) else {
            return Err(ApplyError::UnknownFile(e.name));
        };
        if e.size != inc.written {
            return Err(ApplyError::Protocol(format!(
                "{} ended at {} bytes but {} arrived",
                e.name, e.size, inc.written
            )));
        }
        // Every write done (or its error, such as a full disk), then the
        // fsync that makes them durable, direct writes included.
        // Refused before the last bytes are written (they wait in the
        // writer's buffer): a refused FileEnd changes nothing.
        wirepath::resolve_under(dest, &inc.name)?;
        // A failed write (a full disk) or fsync leaves nothing behind: the
        // partial copy would hold the space until the next start.
        let synced = inc
            .writer
            .finish()
            .map_err(io_err(format!("writing {}", inc.name)))
            .and_then(|done| {
                done.file
                    .sync_all()
                    .map_err(io_err(format!("fsync of {}", inc.name)))?;
                Ok(done)
            });
        let done = match synced {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_file(&inc.temp);
                return Err(e.into());
            }
        };
        tracing::debug!(file = %inc.name, bytes = inc.written, direct = done.direct_bytes, "file received");
        drop(done);
        // Resolve again: a symlink may have appeared since FileStart.
        let path = wirepath::resolve_under(dest, &inc.name)?;
        let parent = path.parent().unwrap_or(dest).to_path_buf();
        create_dirs_durably(dest, &parent)
            .map_err(io_err(format!("creating the directory of {}", inc.name)))?;
        std::fs::rename(&inc.temp, &path).map_err(io_err(format!("placing {}", inc.name)))?;
        fsync_dir(&parent).map_err(io_err("fsync of a directory"))?;
        Ok(Placed {
            name: inc.name,
            page_size: inc.pages.page as u32,
            size: inc.written,
            page_digests: inc.pages.finish(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{page_digests, ApplyError, FileReceiver};
    use tandem_shared::wire::{FileChunk, FileEnd, FileKind, FileStart};

    /// The digests recorded from the bytes as they arrive are the ones the
    /// scrub computes from the file afterwards, however the bytes were cut
    /// into chunks (pages split across chunks, a short last page).
    #[test]
    fn page_digests_as_received_match_the_file_on_disk() {
        let (dir, mut r, data) = receiving("a.db", 4096 * 5 + 1000);
        let root = dir.path().join("root");
        let mut at = 0;
        for len in [100, 4096, 5000, 3092, 1, 20_000] {
            let end = (at + len).min(data.len());
            r.chunk(plain_chunk("a.db", at as u64, &data[at..end]))
                .expect("chunk");
            at = end;
        }
        assert_eq!(at, data.len());
        let placed = end(&mut r, "a.db", data.len(), &root);
        assert_eq!(std::fs::read(root.join("a.db")).expect("read"), data);
        let on_disk =
            crate::scrub::digests::digest_file("a.db", "b", &root.join("a.db")).expect("digest");
        assert_eq!(placed.page_size, 4096);
        assert_eq!(placed.size, data.len() as u64);
        assert_eq!(placed.page_digests.len(), 6 * 16);
        // digest_file reads the page size from the file: not a database
        // here, so the scrub's default, which is the one used above.
        assert_eq!(on_disk.page_size, placed.page_size);
        assert_eq!(on_disk.digests, placed.page_digests);
    }

    /// A receiver that started the database `name` of `len` bytes of
    /// 4 KiB pages into `DIR/root` (scratch `DIR/in`), and those bytes.
    fn receiving(name: &str, len: u32) -> (tempfile::TempDir, FileReceiver, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, scratch) = (dir.path().join("root"), dir.path().join("in"));
        std::fs::create_dir_all(&root).expect("root");
        std::fs::create_dir_all(&scratch).expect("scratch");
        let data: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut r = FileReceiver::default();
        r.start(
            &root,
            &scratch,
            FileStart {
                name: name.into(),
                size: data.len() as u64,
                kind: FileKind::Database as i32,
                page_size: 4096,
                base_bytes_left: 0,
            },
        )
        .expect("start");
        (dir, r, data)
    }

    /// A chunk checked by its `blake3`.
    fn plain_chunk(name: &str, offset: u64, data: &[u8]) -> FileChunk {
        FileChunk {
            name: name.into(),
            offset,
            data: bytes::Bytes::copy_from_slice(data),
            blake3: bytes::Bytes::copy_from_slice(blake3::hash(data).as_bytes()),
            ..Default::default()
        }
    }

    /// Ends the file `name` of `size` bytes, placing it under `root`.
    fn end(r: &mut FileReceiver, name: &str, size: usize, root: &std::path::Path) -> super::Placed {
        r.end(
            FileEnd {
                name: name.into(),
                size: size as u64,
            },
            root,
        )
        .expect("end")
    }

    fn pages_chunk(name: &str, offset: u64, data: &[u8], check: &[u8]) -> FileChunk {
        let hashes = tandem_shared::pages::page_hashes(check, 4096);
        FileChunk {
            name: name.into(),
            offset,
            data: bytes::Bytes::copy_from_slice(data),
            pages_blake3: bytes::Bytes::copy_from_slice(blake3::hash(&hashes).as_bytes()),
            ..Default::default()
        }
    }

    /// A chunk checked by its pages (`pages_blake3`): one flipped byte is
    /// refused and nothing of it written; the check is only accepted alone
    /// and on a page boundary; the file and the recorded page digests come
    /// out as with `blake3`.
    #[test]
    fn a_chunk_checked_by_its_pages_refuses_a_flipped_byte() {
        let (dir, mut r, data) = receiving("a.db", 4096 * 5 + 1000);
        let root = dir.path().join("root");
        let first = &data[..8192];
        r.chunk(pages_chunk("a.db", 0, first, first))
            .expect("intact");
        let rest = &data[8192..];
        for at in [0, 4095, 4096, rest.len() - 1] {
            let mut flipped = rest.to_vec();
            flipped[at] ^= 1;
            let e = r.chunk(pages_chunk("a.db", 8192, &flipped, rest));
            assert!(
                matches!(e, Err(ApplyError::Digest { .. })),
                "byte {at} flipped: {e:?}"
            );
        }
        let mut both = pages_chunk("a.db", 8192, rest, rest);
        both.blake3 = bytes::Bytes::copy_from_slice(blake3::hash(rest).as_bytes());
        assert!(matches!(r.chunk(both), Err(ApplyError::Protocol(_))));
        // Off a page boundary (after a plain chunk of 100 bytes).
        r.chunk(plain_chunk("a.db", 8192, &data[8192..8292]))
            .expect("plain chunk");
        let tail = &data[8292..];
        assert!(matches!(
            r.chunk(pages_chunk("a.db", 8292, tail, tail)),
            Err(ApplyError::Protocol(_))
        ));
        r.chunk(plain_chunk("a.db", 8292, tail))
            .expect("plain tail");
        let placed = end(&mut r, "a.db", data.len(), &root);
        assert_eq!(std::fs::read(root.join("a.db")).expect("read"), data);
        assert_eq!(placed.page_digests, page_digests(&data, 4096));
    }

    /// Pages-checked chunks all the way, the last page short: the digests
    /// recorded are the scrub's.
    #[test]
    fn page_digests_of_page_checked_chunks_match_the_file() {
        let (dir, mut r, data) = receiving("b.db", 4096 * 70 + 1000);
        let root = dir.path().join("root");
        for (i, piece) in data.chunks(4096 * 32).enumerate() {
            r.chunk(pages_chunk("b.db", (i * 4096 * 32) as u64, piece, piece))
                .expect("chunk");
        }
        let placed = end(&mut r, "b.db", data.len(), &root);
        let on_disk =
            crate::scrub::digests::digest_file("b.db", "b", &root.join("b.db")).expect("digest");
        assert_eq!(on_disk.digests, placed.page_digests);
    }
}
