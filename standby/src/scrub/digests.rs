//! Page digests recorded when a mirror file is written, so a scrub can later
//! prove that every byte is still what arrived.
//!
//! The mirror's database files never change between bases (the standby only
//! installs whole files, fsynced, and a rebase swaps whole files in), so one
//! record per file, written right after the file is in place, describes it
//! for as long as the base lives. A record is `.tandem/pages/<id>.pages`:
//! a header line (magic, format version, blake3 of the body), a JSON line
//! (file name, base, page size, size) and 16 bytes of blake3 per page
//! (`tandem_shared::pages::page_digests`, the same digests a rebase request
//! sends). It is written partial, fsync, rename, fsync of the directory, so
//! a crash leaves the old record or the new one, never a torn one.

use crate::state::{BaseState, StandbyDir};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tandem_shared::durable::fsync_dir;
use tandem_shared::ioerror::{io_err, IoError};
use tandem_shared::pages::{page_digests, read_at_most, PAGE_DIGEST_LEN};
use tandem_shared::wirepath::{self, PathError};

const PAGES_DIR: &str = "pages";
const MAGIC: &str = "TANDEM-PAGES";
const FORMAT_VERSION: u32 = 1;
/// Page size used for files that are not BDB databases (DB_CONFIG): any
/// size works for a digest, and a flipped byte there matters as much.
const NON_DB_PAGE_SIZE: u32 = 4096;
/// Bytes read at a time while digesting a file.
pub(crate) const READ_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("refused file name: {0}")]
    Path(#[from] PathError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: not a page digest record ({why})")]
    Corrupt { path: PathBuf, why: &'static str },
}

/// What was recorded for one file of the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRecord {
    /// The file's name relative to the home (as on the wire).
    pub name: String,
    /// The base the file belongs to: a record of another base describes a
    /// file that has since been replaced.
    pub base_id: String,
    pub page_size: u32,
    pub size: u64,
    #[serde(skip)]
    pub digests: Vec<u8>,
}

impl PageRecord {
    pub fn pages(&self) -> u64 {
        (self.digests.len() / PAGE_DIGEST_LEN) as u64
    }

    /// The recorded digest of page `n`, if the file had that page.
    pub fn page(&self, n: u64) -> Option<&[u8]> {
        let at = usize::try_from(n).ok()?.checked_mul(PAGE_DIGEST_LEN)?;
        self.digests.get(at..at + PAGE_DIGEST_LEN)
    }
}

fn pages_dir(dir: &StandbyDir) -> PathBuf {
    dir.meta().join(PAGES_DIR)
}

/// Where the record of `name` lives: names may hold '/', so the record is
/// named by a digest of the name (the name itself is inside).
fn record_path(dir: &StandbyDir, name: &str) -> PathBuf {
    pages_dir(dir).join(format!(
        "{}.pages",
        &blake3::hash(name.as_bytes()).to_hex()[..32]
    ))
}

/// The page size a file is digested with: its BDB page size, so one digest
/// covers exactly one page (a scrub failure then names the page).
pub fn page_size_of(path: &Path) -> io::Result<u32> {
    Ok(tandem_shared::envlayout::read_db_meta(path)?.map_or(NON_DB_PAGE_SIZE, |m| m.page_size))
}

/// Digests every page of the file at `path` as it is on disk now.
pub fn digest_file(name: &str, base_id: &str, path: &Path) -> Result<PageRecord, DigestError> {
    let page_size = page_size_of(path).map_err(io_err(format!("reading {name}")))?;
    let f = File::open(path).map_err(io_err(format!("opening {name}")))?;
    let page = page_size as usize;
    let mut buf = vec![0u8; (READ_CHUNK / page).max(1) * page];
    let (mut at, mut digests) = (0u64, Vec::new());
    loop {
        let n = read_at_most(&f, &mut buf, at).map_err(io_err(format!("reading {name}")))?;
        digests.extend_from_slice(&page_digests(&buf[..n], page));
        at += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(PageRecord {
        name: name.to_owned(),
        base_id: base_id.to_owned(),
        page_size,
        size: at,
        digests,
    })
}

/// Records the digests of `name` (at `path`, fsynced and under its name)
/// as a file of base `base_id`. The hook of `Mirror::install`.
pub fn record_file(
    dir: &StandbyDir,
    base_id: &str,
    name: &str,
    path: &Path,
) -> Result<(), DigestError> {
    let record = digest_file(name, base_id, path)?;
    store(dir, &record)
}

/// Records every file of `base` whose record is missing or belongs to
/// another base. The hook of `Mirror::swap_in`, called after the staged
/// files are in place and before the new base is recorded: a swap finished
/// after a crash runs it again, and files recorded before the crash are
/// not read twice.
pub fn record_base(dir: &StandbyDir, base: &BaseState) -> Result<(), DigestError> {
    for name in &base.complete_files {
        if load(dir, name)?.is_some_and(|r| r.base_id == base.base_id) {
            continue;
        }
        let path = wirepath::resolve_under(&dir.root, name)?;
        record_file(dir, &base.base_id, name, &path)?;
    }
    Ok(())
}

/// Checks bytes a rebase copies from the mirror's own file (FileSame)
/// against the digests recorded for it. The primary skipped those pages
/// because their digests matched what the standby sent when it asked; a
/// page damaged since would otherwise be copied into the new base and
/// recorded there as good. Files without a record (an older Tandem) and runs
/// not aligned to the recorded page size are not checked.
pub fn check_reused(
    dir: &StandbyDir,
    base_id: &str,
    name: &str,
    offset: u64,
    data: &[u8],
) -> Result<(), String> {
    static LAST: std::sync::Mutex<Option<(PathBuf, PageRecord)>> = std::sync::Mutex::new(None);
    let mut cache = LAST
        .lock()
        .map_err(|_| "page record cache poisoned".to_owned())?;
    let key = record_path(dir, name);
    let fresh = cache
        .as_ref()
        .is_some_and(|(k, r)| *k == key && r.base_id == base_id);
    if !fresh {
        *cache = load(dir, name)
            .map_err(|e| e.to_string())?
            .filter(|r| r.base_id == base_id)
            .map(|r| (key, r));
    }
    let Some((_, record)) = cache.as_ref() else {
        return Ok(());
    };
    let page = u64::from(record.page_size.max(1));
    if !offset.is_multiple_of(page) {
        return Ok(());
    }
    let first = offset / page;
    for (i, d) in page_digests(data, page as usize)
        .chunks(PAGE_DIGEST_LEN)
        .enumerate()
    {
        let n = first + i as u64;
        if record.page(n).is_some_and(|want| want != d) {
            return Err(format!(
                "{name} page {n} was to be reused for the new base but differs from the digest \
                 recorded when it was written (damaged at rest): the rebase is abandoned, the \
                 scrub asks again with the page's current digest"
            ));
        }
    }
    Ok(())
}

/// [`record_file`] for `Mirror::install`, with the error as an `io::Error`
/// (a full disk stays recognisable as one).
pub fn on_install(dir: &StandbyDir, base_id: &str, name: &str, path: &Path) -> io::Result<()> {
    record_file(dir, base_id, name, path).map_err(DigestError::into_io)
}

/// [`record_base`] for `Mirror::swap_in`.
pub fn on_swap_in(dir: &StandbyDir, base: &BaseState) -> io::Result<()> {
    record_base(dir, base).map_err(DigestError::into_io)
}

impl DigestError {
    pub fn into_io(self) -> io::Error {
        match self {
            DigestError::Io(e) => e.source,
            other => io::Error::other(other.to_string()),
        }
    }
}

pub fn store(dir: &StandbyDir, record: &PageRecord) -> Result<(), DigestError> {
    let pages = pages_dir(dir);
    if !pages.is_dir() {
        std::fs::create_dir_all(&pages).map_err(io_err("creating .tandem/pages"))?;
        fsync_dir(&dir.meta()).map_err(io_err("fsync of .tandem"))?;
    }
    let meta = serde_json::to_vec(record)
        .map_err(|e| IoError::new("encoding a page record", io::Error::other(e)))?;
    let mut body = meta;
    body.push(b'\n');
    body.extend_from_slice(&record.digests);
    let mut out = format!(
        "{MAGIC} v{FORMAT_VERSION} {}\n",
        blake3::hash(&body).to_hex()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    write_durably(&record_path(dir, &record.name), &out).map_err(io_err(format!(
        "recording the page digests of {}",
        record.name
    )))?;
    Ok(())
}

/// The record of `name`, `None` if none was written. A record that does not
/// match its own checksum is an error: the scrub reports it as damage.
pub fn load(dir: &StandbyDir, name: &str) -> Result<Option<PageRecord>, DigestError> {
    let path = record_path(dir, name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e).into()),
    };
    let corrupt = |why| DigestError::Corrupt {
        path: path.clone(),
        why,
    };
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header"))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("bad header"))?;
    let mut parts = header.split(' ');
    if parts.next() != Some(MAGIC) || parts.next() != Some("v1") {
        return Err(corrupt("bad magic or version"));
    }
    let body = &bytes[nl + 1..];
    if parts.next() != Some(blake3::hash(body).to_hex().as_str()) {
        return Err(corrupt("checksum mismatch"));
    }
    let meta_len = body
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no description"))?;
    let mut record: PageRecord =
        serde_json::from_slice(&body[..meta_len]).map_err(|_| corrupt("bad description"))?;
    record.digests = body[meta_len + 1..].to_vec();
    if !record.digests.len().is_multiple_of(PAGE_DIGEST_LEN) || record.name != name {
        return Err(corrupt("digests do not describe the file"));
    }
    Ok(Some(record))
}

/// Partial, fsync, rename, fsync of the directory. The partial name holds
/// the pid: a one-off `scrub` may record a file while `run` does.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(".{}.partial", std::process::id()));
    let partial = PathBuf::from(partial);
    {
        let mut f = File::create(&partial)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&partial, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby() -> (tempfile::TempDir, StandbyDir) {
        let t = tempfile::tempdir().unwrap();
        let dir = StandbyDir::new(t.path());
        dir.create().unwrap();
        (t, dir)
    }

    #[test]
    fn a_record_round_trips_and_a_damaged_record_is_refused() {
        let (_t, dir) = standby();
        let file = dir.root.join("sub").join("x.db");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, vec![7u8; 10_000]).unwrap();
        record_file(&dir, "b1", "sub/x.db", &file).unwrap();
        let r = load(&dir, "sub/x.db").unwrap().unwrap();
        assert_eq!((r.size, r.page_size, r.pages()), (10_000, 4096, 3));
        assert_eq!(r.base_id, "b1");
        assert!(load(&dir, "other.db").unwrap().is_none());

        let p = record_path(&dir, "sub/x.db");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            load(&dir, "sub/x.db"),
            Err(DigestError::Corrupt {
                why: "checksum mismatch",
                ..
            })
        ));
    }

    #[test]
    fn reused_pages_must_match_what_was_recorded() {
        let (_t, dir) = standby();
        let mut data = vec![3u8; 3 * 4096];
        std::fs::write(dir.root.join("c.db"), &data).unwrap();
        record_file(&dir, "b", "c.db", &dir.root.join("c.db")).unwrap();
        assert!(check_reused(&dir, "b", "c.db", 4096, &data[4096..]).is_ok());
        data[5000] ^= 0x10;
        let e = check_reused(&dir, "b", "c.db", 4096, &data[4096..]).unwrap_err();
        assert!(e.contains("c.db page 1"), "{e}");
        // Another base's record says nothing about this base's file.
        assert!(check_reused(&dir, "other", "c.db", 4096, &data[4096..]).is_ok());
    }

    #[test]
    fn recording_a_base_skips_files_already_recorded_for_it() {
        let (_t, dir) = standby();
        for n in ["a.db", "b.db"] {
            std::fs::write(dir.root.join(n), vec![1u8; 5000]).unwrap();
        }
        record_file(&dir, "old", "a.db", &dir.root.join("a.db")).unwrap();
        record_file(&dir, "new", "b.db", &dir.root.join("b.db")).unwrap();
        // b.db changes on disk: recorded for the new base already, it is
        // not read again (a resumed swap must not trust a changed file).
        std::fs::write(dir.root.join("b.db"), vec![2u8; 5000]).unwrap();
        let base = BaseState {
            base_id: "new".into(),
            complete_files: ["a.db".to_owned(), "b.db".to_owned()].into(),
            ..Default::default()
        };
        record_base(&dir, &base).unwrap();
        assert_eq!(load(&dir, "a.db").unwrap().unwrap().base_id, "new");
        let b = load(&dir, "b.db").unwrap().unwrap();
        assert_eq!(b.page(0).unwrap(), &page_digests(&[1u8; 4096], 4096)[..]);
    }
}
