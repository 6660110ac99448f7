//! TOML configuration files that mirror the command-line flags. Every flag
//! of a `run` command is an optional field; the file is read with unknown
//! keys refused, then flags given on the command line win.

use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
}

/// Overlays the flags that were given (`Some`) on the config file's values.
/// Both sides are the same struct; `None` fields must be skipped when
/// serializing (`#[serde(skip_serializing_if = "Option::is_none")]`).
pub fn merge_with_file<T: Serialize + DeserializeOwned>(
    flags: &T,
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    let Some(path) = file else {
        let value = serde_json::to_value(flags).map_err(|e| parse_err("<flags>", e))?;
        return serde_json::from_value(value).map_err(|e| parse_err("<flags>", e));
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    // Parse into T first so unknown keys and bad values are reported with
    // the file's own names.
    let from_file: T = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: shown.clone(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let mut merged = serde_json::to_value(&from_file).map_err(|e| parse_err(&shown, e))?;
    let flags = serde_json::to_value(flags).map_err(|e| parse_err(&shown, e))?;
    if let (Some(m), serde_json::Value::Object(f)) = (merged.as_object_mut(), flags) {
        for (k, v) in f {
            m.insert(k, v);
        }
    }
    serde_json::from_value(merged).map_err(|e| parse_err(&shown, e))
}

fn parse_err(path: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq, Default)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Opts {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        poll_ms: Option<u64>,
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\npoll-ms = 5\n").unwrap();
        let flags = Opts {
            listen: None,
            poll_ms: Some(9),
        };
        let m = merge_with_file(&flags, Some(&p)).unwrap();
        assert_eq!(
            m,
            Opts {
                listen: Some("127.0.0.1:1".into()),
                poll_ms: Some(9)
            }
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "lisen = \"x\"\n").unwrap();
        let e = merge_with_file(&Opts::default(), Some(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        std::fs::write(&p, "poll-ms = \"fast\"\n").unwrap();
        let e = merge_with_file(&Opts::default(), Some(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("poll-ms") || e.contains("invalid type"), "{e}");
    }
}
