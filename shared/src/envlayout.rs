//! The shape of a Berkeley DB environment on disk: where its database files
//! and log files live (from `DB_CONFIG`), and which files are databases.
//!
//! Tandem mirrors that shape under the standby's directory, so the names it
//! uses on the wire are paths relative to the environment home.

use crate::ioerror::{io_err, IoError};
use crate::logfile::parse_log_file_name;
use crate::pages::PageProof;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// `what` is the file's path.
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("DB_CONFIG line {line}: {what}")]
    Config { line: usize, what: String },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} cannot be shipped: {why}")]
    Unshippable { path: PathBuf, why: String },
}

/// Directories named by `DB_CONFIG`, relative to the home.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbConfigLayout {
    pub data_dirs: Vec<PathBuf>,
    pub log_dir: Option<PathBuf>,
}

/// Reads the directory settings of a `DB_CONFIG`. Absolute or escaping
/// directories are refused: the standby must be able to rebuild the same
/// layout under its own directory.
pub fn parse_db_config(text: &str) -> Result<DbConfigLayout, EnvError> {
    let mut layout = DbConfigLayout::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or_default();
        let value = words.next();
        let dir = |v: Option<&str>| -> Result<PathBuf, EnvError> {
            let v = v.ok_or_else(|| EnvError::Config {
                line: i + 1,
                what: format!("{key} needs a directory"),
            })?;
            let p = PathBuf::from(v);
            if p.components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            {
                Ok(p)
            } else {
                Err(EnvError::Config {
                    line: i + 1,
                    what: format!("{key} {v}: Tandem supports only directories relative to the environment home, without '..'"),
                })
            }
        };
        match key {
            "set_data_dir" | "add_data_dir" | "set_create_dir" => {
                let d = dir(value)?;
                if !layout.data_dirs.contains(&d) {
                    layout.data_dirs.push(d);
                }
            }
            "set_lg_dir" => layout.log_dir = Some(dir(value)?),
            _ => {}
        }
    }
    Ok(layout)
}

/// What page 0 of a database file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbMeta {
    pub page_size: u32,
    /// How one read of its pages is proven whole: by BDB's page checksum
    /// when the database has one in this host's byte order.
    pub proof: PageProof,
}

const DB_MAGICS: [u32; 4] = [0x0005_3162, 0x0006_1561, 0x0004_2253, 0x0007_4582];

/// Reads the meta page header (BDB-NOTES.md §2): magic at byte 12, page size at
/// byte 20, `encrypt_alg` and `metaflags` at 24 and 26. Accepts either byte
/// order, since the order is the creating host's. `None` if the file is not a
/// BDB database. One read, not proven stable: the header's fields do not
/// change after creation, and a wrong `proof` costs only speed (a page the
/// checksum does not prove is read again).
pub fn read_db_meta(path: &Path) -> io::Result<Option<DbMeta>> {
    let mut head = [0u8; 27];
    let mut f = File::open(path)?;
    if f.read(&mut head)? < head.len() {
        return Ok(None);
    }
    let le = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let be = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let page_size = if DB_MAGICS.contains(&le(12)) {
        le(20)
    } else if DB_MAGICS.contains(&be(12)) {
        be(20)
    } else {
        return Ok(None);
    };
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(None);
    }
    let host_order = DB_MAGICS.contains(&u32::from_ne_bytes([
        head[12], head[13], head[14], head[15],
    ]));
    let proof = if host_order && crate::page_checksum::meta_says_checksummed(&head) {
        PageProof::Checksum
    } else {
        PageProof::TwoReads
    };
    Ok(Some(DbMeta { page_size, proof }))
}

/// A database file of the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFile {
    /// Path relative to the home, '/'-separated: the name used on the wire.
    pub name: String,
    pub page_size: u32,
    pub proof: PageProof,
}

/// An environment home and the directories its `DB_CONFIG` names.
#[derive(Debug, Clone)]
pub struct EnvLayout {
    pub home: PathBuf,
    pub config: DbConfigLayout,
}

pub const DB_CONFIG: &str = "DB_CONFIG";

impl EnvLayout {
    pub fn open(home: &Path) -> Result<Self, EnvError> {
        if !home.is_dir() {
            return Err(EnvError::NotADirectory(home.to_path_buf()));
        }
        let cfg_path = home.join(DB_CONFIG);
        let config = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => parse_db_config(&text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DbConfigLayout::default(),
            Err(e) => return Err(io_err(cfg_path.display().to_string())(e).into()),
        };
        Ok(Self {
            home: home.to_path_buf(),
            config,
        })
    }

    /// Log directory relative to the home ("" for the home itself).
    pub fn log_dir_rel(&self) -> PathBuf {
        self.config.log_dir.clone().unwrap_or_default()
    }

    pub fn log_dir(&self) -> PathBuf {
        self.home.join(self.log_dir_rel())
    }

    /// The wire name of log file `number`.
    pub fn log_name(&self, number: u32) -> String {
        rel_name(
            &self
                .log_dir_rel()
                .join(crate::logfile::log_file_name(number)),
        )
    }

    pub fn log_path(&self, number: u32) -> PathBuf {
        self.log_dir().join(crate::logfile::log_file_name(number))
    }

    /// Numbers of the log files present, ascending.
    pub fn log_files(&self) -> Result<Vec<u32>, EnvError> {
        let dir = self.log_dir();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(dir.display().to_string()))? {
            let entry = entry.map_err(io_err(dir.display().to_string()))?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_log_file_name) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every database file at any depth under the home and the data
    /// directories, whether or not `db_archive -s` would list it (BDB-NOTES.md §1,
    /// §10: `DB->open(.., "sub/x.db", ..)` puts a database below the home).
    /// Partition files (`__dbp.NAME.NNN`) carry their own meta page; queue
    /// extents (`__dbq.NAME.N`) have none and take the page size of their
    /// queue `NAME` beside them. Left out: region files (`__db.*`), logs,
    /// `DB_CONFIG`, hidden entries (Tandem's `.tandem`) and files without a
    /// BDB meta page. Symlinks below a directory are not followed (nothing
    /// outside the home is shipped); a symlink that points at a database is
    /// an error, as is any file or directory that cannot be read: a standby
    /// without it would not recover.
    pub fn database_files(&self) -> Result<Vec<DatabaseFile>, EnvError> {
        let mut dirs = vec![PathBuf::new()];
        dirs.extend(self.config.data_dirs.iter().cloned());
        let mut out = Vec::new();
        for rel in dirs {
            self.walk(&rel, &mut out)?;
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }

    fn walk(&self, rel: &Path, out: &mut Vec<DatabaseFile>) -> Result<(), EnvError> {
        let dir = self.home.join(rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(dir.display().to_string())(e).into()),
        };
        let mut queue_extents = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(dir.display().to_string()))?;
            let Some(fname) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if is_region_file(&fname)
                || fname.starts_with('.')
                || (rel.as_os_str().is_empty() && fname == DB_CONFIG)
                || parse_log_file_name(&fname).is_some()
            {
                continue;
            }
            let path = entry.path();
            let name = rel.join(&fname);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Removed between listing and reading: not part of this
                // listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(path.display().to_string())(e).into()),
            };
            if meta.is_dir() {
                self.walk(&name, out)?;
                continue;
            }
            if meta.file_type().is_symlink() {
                if let Ok(Some(_)) = read_db_meta(&path) {
                    return Err(EnvError::Unshippable {
                        path,
                        why: "a symlink to a database; Tandem ships only regular files inside the environment".into(),
                    });
                }
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            if let Some(queue) = queue_extent_of(&fname) {
                queue_extents.push((name, dir.join(queue)));
                continue;
            }
            match read_db_meta(&path) {
                Ok(Some(meta)) => out.push(DatabaseFile {
                    name: rel_name(&name),
                    page_size: meta.page_size,
                    proof: meta.proof,
                }),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path.display().to_string())(e).into()),
            }
        }
        for (name, queue) in queue_extents {
            match read_db_meta(&queue) {
                Ok(Some(meta)) => out.push(DatabaseFile {
                    name: rel_name(&name),
                    page_size: meta.page_size,
                    proof: meta.proof,
                }),
                // An extent whose queue is gone is being removed with it.
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(queue.display().to_string())(e).into()),
            }
        }
        Ok(())
    }
}

/// BDB's region files (`__db.001`, `__db.register`, ...): shared memory
/// backing, rebuilt by every open, never shipped. Partition files
/// (`__dbp.`) and queue extents (`__dbq.`) share the `__db` prefix but are
/// data.
pub fn is_region_file(name: &str) -> bool {
    name.starts_with("__db.")
}

/// Partition files and queue extents: data files that belong to a database
/// and are reached through it (`db_verify` checks them through `NAME`).
pub fn is_database_part(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.starts_with("__dbp.") || base.starts_with("__dbq.")
}

/// `__dbq.NAME.N` (BDB 5.3's queue extent of database `NAME`) -> `NAME`.
fn queue_extent_of(fname: &str) -> Option<&str> {
    let rest = fname.strip_prefix("__dbq.")?;
    let (queue, n) = rest.rsplit_once('.')?;
    (!queue.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(queue)
}

/// '/'-separated form of a relative path, without "./" parts.
pub fn rel_name(p: &Path) -> String {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directories_and_ignores_the_rest() {
        let l = parse_db_config(
            "# c\nset_cachesize 0 1000 1\nset_data_dir data\nadd_data_dir more\nset_lg_dir logs\n",
        )
        .unwrap();
        assert_eq!(
            l.data_dirs,
            vec![PathBuf::from("data"), PathBuf::from("more")]
        );
        assert_eq!(l.log_dir, Some(PathBuf::from("logs")));
    }

    #[test]
    fn refuses_directories_outside_the_home() {
        assert!(parse_db_config("set_lg_dir /var/log/x\n").is_err());
        assert!(parse_db_config("set_data_dir ../elsewhere\n").is_err());
        assert!(parse_db_config("set_data_dir\n").is_err());
    }

    #[test]
    fn finds_databases_by_their_meta_page() {
        let dir = tempfile::tempdir().unwrap();
        let mut page = vec![0u8; 4096];
        page[12..16].copy_from_slice(&0x0005_3162u32.to_le_bytes());
        page[20..24].copy_from_slice(&4096u32.to_le_bytes());
        std::fs::write(dir.path().join("a.db"), &page).unwrap();
        std::fs::write(dir.path().join("__db.001"), &page).unwrap();
        std::fs::write(
            dir.path().join("notes.txt"),
            b"hello there, not a database at all",
        )
        .unwrap();
        std::fs::write(dir.path().join("log.0000000001"), &page).unwrap();
        let env = EnvLayout::open(dir.path()).unwrap();
        assert_eq!(
            env.database_files().unwrap(),
            vec![DatabaseFile {
                name: "a.db".into(),
                page_size: 4096,
                proof: PageProof::TwoReads,
            }]
        );
        assert_eq!(env.log_files().unwrap(), vec![1]);
        assert_eq!(env.log_name(1), "log.0000000001");
    }

    fn meta_page(page_size: u32) -> Vec<u8> {
        let mut page = vec![0u8; page_size as usize];
        page[12..16].copy_from_slice(&0x0005_3162u32.to_le_bytes());
        page[20..24].copy_from_slice(&page_size.to_le_bytes());
        page
    }

    #[test]
    fn finds_databases_at_any_depth_with_partitions_and_queue_extents() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        std::fs::create_dir_all(home.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(home.join(".tandem")).unwrap();
        std::fs::write(home.join("DB_CONFIG"), "set_data_dir data\n").unwrap();
        std::fs::create_dir_all(home.join("data/nested")).unwrap();
        std::fs::write(home.join("sub/deeper/x.db"), meta_page(4096)).unwrap();
        std::fs::write(home.join("sub/__dbp.part.db.000"), meta_page(8192)).unwrap();
        std::fs::write(home.join("sub/queue.db"), meta_page(2048)).unwrap();
        // Queue extents start with a data page, not a meta page.
        std::fs::write(home.join("sub/__dbq.queue.db.7"), vec![1u8; 4096]).unwrap();
        std::fs::write(home.join("sub/__dbq.gone.db.0"), vec![1u8; 4096]).unwrap();
        std::fs::write(home.join("data/nested/y.db"), meta_page(4096)).unwrap();
        std::fs::write(home.join("sub/__db.001"), meta_page(4096)).unwrap();
        std::fs::write(home.join(".tandem/hidden.db"), meta_page(4096)).unwrap();
        let env = EnvLayout::open(home).unwrap();
        let found: Vec<(String, u32)> = env
            .database_files()
            .unwrap()
            .into_iter()
            .map(|f| (f.name, f.page_size))
            .collect();
        assert_eq!(
            found,
            vec![
                ("data/nested/y.db".into(), 4096),
                ("sub/__dbp.part.db.000".into(), 8192),
                ("sub/__dbq.queue.db.7".into(), 2048),
                ("sub/deeper/x.db".into(), 4096),
                ("sub/queue.db".into(), 2048),
            ]
        );
        assert!(is_database_part("sub/__dbq.queue.db.7"));
        assert!(!is_database_part("sub/queue.db"));
    }

    #[test]
    fn a_symlink_to_a_database_is_refused_and_nothing_outside_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("o.db"), meta_page(4096)).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linked")).unwrap();
        let env = EnvLayout::open(dir.path()).unwrap();
        assert_eq!(env.database_files().unwrap(), vec![]);
        std::os::unix::fs::symlink(outside.path().join("o.db"), dir.path().join("l.db")).unwrap();
        let err = env.database_files().unwrap_err().to_string();
        assert!(err.contains("l.db") && err.contains("symlink"), "{err}");
    }
}
