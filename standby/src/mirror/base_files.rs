//! The base's database files as they sit in the mirror: their page digests
//! recorded for the scrub when placed, made durable at open, and digested
//! page by page for a rebase request (so the primary sends only the pages
//! that differ).

use crate::mirror::apply_error::ApplyError;
use crate::state::{BaseState, StandbyDir, StandbyState};
use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use tandem_shared::durable::fsync_dir;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::ioerror::io_err;
use tandem_shared::wirepath;

/// Records the page digests of a file just placed in the mirror for the
/// scrub: those computed as it arrived when they are in the page size the
/// scrub uses for it (its BDB page size), else read from the file again.
pub fn record_page_digests(
    dir: &StandbyDir,
    base_id: &str,
    placed: crate::mirror::receiver::Placed,
) -> io::Result<()> {
    use crate::scrub::digests;
    let path = wirepath::resolve_under(&dir.root, &placed.name).map_err(io::Error::other)?;
    if digests::page_size_of(&path)? != placed.page_size {
        return digests::on_install(dir, base_id, &placed.name, &path);
    }
    let record = digests::PageRecord {
        name: placed.name,
        base_id: base_id.to_owned(),
        page_size: placed.page_size,
        size: placed.size,
        digests: placed.page_digests,
    };
    digests::store(dir, &record).map_err(digests::DigestError::into_io)
}

/// Fsyncs the base's database files and their directories: a crash may
/// have left a rename or a write only in the page cache, and nothing may be
/// acknowledged as durable on top of it.
pub fn make_durable(dir: &StandbyDir, state: &StandbyState) -> Result<(), ApplyError> {
    let Some(base) = &state.base else {
        return Ok(());
    };
    let mut parents: BTreeSet<PathBuf> = BTreeSet::new();
    parents.insert(dir.root.clone());
    for name in &base.complete_files {
        let path = wirepath::resolve_under(&dir.root, name)?;
        match File::open(&path) {
            Ok(f) => f.sync_all().map_err(io_err(format!("fsync of {name}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::error!(file = %name, "a file of the base is missing");
            }
            Err(e) => return Err(io_err(format!("opening {name}"))(e).into()),
        }
        if let Some(p) = path.parent() {
            parents.insert(p.to_path_buf());
        }
    }
    for p in parents {
        fsync_dir(&p).map_err(io_err("fsync of a directory"))?;
    }
    Ok(())
}

/// Page digests of the base's database files, for a RebaseRequest.
pub fn page_digests(
    dir: &StandbyDir,
    base: &BaseState,
) -> Result<Vec<tandem_shared::wire::PageDigests>, ApplyError> {
    let mut out = Vec::new();
    for name in base.complete_files.iter().filter(|n| *n != DB_CONFIG) {
        let path = wirepath::resolve_under(&dir.root, name)?;
        let Some(meta) = tandem_shared::envlayout::read_db_meta(&path)
            .map_err(io_err(format!("reading {name}")))?
        else {
            continue;
        };
        let f = File::open(&path).map_err(io_err(format!("opening {name}")))?;
        let page = meta.page_size as usize;
        let per_message =
            (tandem_shared::MAX_CHUNK / 2 / tandem_shared::pages::PAGE_DIGEST_LEN).max(1);
        let mut buf = vec![0u8; page * per_message];
        let mut first_page = 0u64;
        loop {
            let n = tandem_shared::pages::read_at_most(&f, &mut buf, first_page * page as u64)
                .map_err(io_err(format!("reading {name}")))?;
            if n == 0 {
                break;
            }
            let digests = tandem_shared::pages::page_digests(&buf[..n], page);
            out.push(tandem_shared::wire::PageDigests {
                name: name.clone(),
                page_size: meta.page_size,
                first_page,
                digests: digests.into(),
            });
            first_page += n.div_ceil(page) as u64;
            if n < buf.len() {
                break;
            }
        }
    }
    Ok(out)
}
