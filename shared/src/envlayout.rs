//! The shape of a Berkeley DB environment on disk: where its database files
//! and log files live (from `DB_CONFIG`), and which files are databases.
//!
//! Tandem mirrors that shape under the standby's directory, so the names it
//! uses on the wire are paths relative to the environment home.

use crate::logfile::parse_log_file_name;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("DB_CONFIG line {line}: {what}")]
    Config { line: usize, what: String },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EnvError + '_ {
    move |source| EnvError::Io {
        path: path.to_path_buf(),
        source,
    }
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
}

const DB_MAGICS: [u32; 4] = [0x0005_3162, 0x0006_1561, 0x0004_2253, 0x0007_4582];

/// Reads the meta page header (BDB.md §2): magic at byte 12, page size at
/// byte 20. Accepts either byte order, since the order is the creating
/// host's. `None` if the file is not a BDB database.
pub fn read_db_meta(path: &Path) -> io::Result<Option<DbMeta>> {
    let mut head = [0u8; 24];
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
    Ok(Some(DbMeta { page_size }))
}

/// A database file of the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFile {
    /// Path relative to the home, '/'-separated: the name used on the wire.
    pub name: String,
    pub page_size: u32,
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
            Err(e) => return Err(io_err(&cfg_path)(e)),
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
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_log_file_name) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every database file in the home and the data directories, whether or
    /// not `db_archive -s` would list it (BDB.md §1): region files, logs,
    /// `DB_CONFIG`, hidden files and anything without a BDB meta page are
    /// left out.
    pub fn database_files(&self) -> Result<Vec<DatabaseFile>, EnvError> {
        let mut dirs = vec![PathBuf::new()];
        dirs.extend(self.config.data_dirs.iter().cloned());
        let mut out = Vec::new();
        for rel in dirs {
            let dir = self.home.join(&rel);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                let Some(fname) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if fname.starts_with("__db")
                    || fname.starts_with('.')
                    || fname == DB_CONFIG
                    || parse_log_file_name(&fname).is_some()
                {
                    continue;
                }
                let path = entry.path();
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_file() => {}
                    _ => continue,
                }
                // A file can vanish between listing and reading (a database
                // being removed); it is simply not part of this listing.
                match read_db_meta(&path) {
                    Ok(Some(meta)) => out.push(DatabaseFile {
                        name: rel_name(&rel.join(&fname)),
                        page_size: meta.page_size,
                    }),
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }
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
                page_size: 4096
            }]
        );
        assert_eq!(env.log_files().unwrap(), vec![1]);
        assert_eq!(env.log_name(1), "log.0000000001");
    }
}
