//! Where Tandem keeps its records in etcd and what they hold (JSON).
//!
//! Everything of one cluster lives under `/tandem/CLUSTER/`:
//!
//! - `leader`: who is primary now, under that primary's lease: it goes when
//!   the lease expires (the primary died or was cut off) or is revoked.
//! - `epoch`: the Tandem epoch of the newest election, never under a lease.
//!   Every election compares its mod revision, so two candidates that saw
//!   the same election cannot both win.
//! - `position`: the primary's end of log and log file size, kept after the
//!   leader key goes, so standbys can measure their lag against it.
//! - `floor`: the durable floor: no commit wait answered durable above it.
//!   A standby that does not hold it may not win.
//! - `members/NAME`: a standby's durable position, under its own lease.
//! - `failover`: the last failover or switchover: who, when, and why.
//! - `switchover`: a planned switchover under way (`tandem-standby
//!   switchover`), under the asking command's lease so a request whose
//!   command died goes by itself; the target standby claims it and the
//!   transaction that moves the leader key deletes it.

use serde::{Deserialize, Serialize};
use tandem_shared::LogPosition;

/// The keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Cluster names are restricted to a safe alphabet so a name can never
    /// reach another cluster's keys.
    pub fn new(cluster: &str) -> Result<Self, crate::Error> {
        if !valid_name(cluster) {
            return Err(crate::Error::BadName {
                what: "cluster",
                name: cluster.to_owned(),
            });
        }
        Ok(Self {
            prefix: format!("/tandem/{cluster}/"),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
    pub fn position(&self) -> String {
        format!("{}position", self.prefix)
    }
    pub fn floor(&self) -> String {
        format!("{}floor", self.prefix)
    }
    pub fn failover(&self) -> String {
        format!("{}failover", self.prefix)
    }
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }
    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }
    pub fn member(&self, name: &str) -> String {
        format!("{}members/{name}", self.prefix)
    }
}

/// Letters, digits, `-`, `_` and `.`, 1 to 128 of them, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What a leader is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaderState {
    /// Serving as primary.
    Primary,
    /// Won the election as a standby; promoting, not yet serving.
    Promoting,
}

/// The value of `leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub name: String,
    pub epoch: u64,
    pub state: LeaderState,
    /// Where standbys reach it (`https://HOST:PORT`), once it serves.
    #[serde(default)]
    pub address: Option<String>,
    pub env_id: Option<String>,
    pub unix_ms: u64,
}

/// The value of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    /// Who took it.
    pub name: String,
    pub unix_ms: u64,
}

/// The value of `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionRecord {
    pub epoch: u64,
    pub end: LogPosition,
    pub lg_max: u32,
    pub unix_ms: u64,
}

/// The value of `floor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorRecord {
    pub epoch: u64,
    pub floor: LogPosition,
    pub unix_ms: u64,
}

/// The value of `members/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    /// The highest epoch the standby has seen.
    pub epoch: u64,
    pub durable: LogPosition,
    /// Whether it holds a recoverable base (one that is not may not win).
    pub recoverable: bool,
    pub unix_ms: u64,
    /// The cluster revision at which this standby read etcd and found no
    /// leader key, when it has seen none since: `durable` was read after
    /// that, so it is final for the vacancy (the old primary fenced before
    /// its lease expired and ships nothing more). Absent while a leader is
    /// seen, and in records of standbys older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaderless_since: Option<i64>,
}

/// The value of `failover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub name: String,
    pub epoch: u64,
    /// "failover" or "switchover".
    pub kind: String,
    pub reason: String,
    pub unix_ms: u64,
    /// A switchover's old primary: the lease its leader key was on (the
    /// new primary revokes it, also when it finishes the switchover after
    /// a restart) and the address it served at (asked whether it stopped
    /// acting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_lease: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_address: Option<String>,
}

/// Where a planned switchover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverState {
    /// Written by the command; the target has not answered yet.
    Requested,
    /// The target standby is catching up and asking the primary.
    Claimed,
    /// The target gave up before the leader key moved: nothing changed.
    Failed,
}

/// The value of `switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRecord {
    /// Unique per request (the command's lease id and time).
    pub id: String,
    /// The primary that hands over (the leader key's holder when asked).
    pub from: String,
    /// The standby that takes over.
    pub to: String,
    /// The epoch of `from`; the target takes `epoch + 1`.
    pub epoch: u64,
    /// How long the target may wait for its catch-up.
    pub catch_up_timeout_ms: u64,
    pub state: SwitchoverState,
    #[serde(default)]
    pub error: Option<String>,
    pub unix_ms: u64,
    /// Wall-clock time (unix ms) after which the request counts as failed
    /// for everyone: the target claims it only before, and moves the
    /// leader key only before the deadline its claim sets; after it anyone
    /// may remove the record. Safety does not rest on clocks: the
    /// take-over compares the record's mod revision, so a removal and a
    /// take-over can never both succeed; the deadline only says when to
    /// stop waiting. None: no deadline (a record of an older Tandem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<u64>,
}

impl SwitchoverRecord {
    /// Past its deadline at `now_unix_ms`: failed, whatever its state says.
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        self.state == SwitchoverState::Failed
            || self.deadline_unix_ms.is_some_and(|d| now_unix_ms >= d)
    }
}

/// Parses a record, naming the key in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, crate::Error> {
    serde_json::from_slice(value).map_err(|e| crate::Error::BadRecord {
        key: key.to_owned(),
        error: e.to_string(),
    })
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Plain structs of numbers and strings: serialising cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_under_the_cluster() {
        let k = Keys::new("prod-1").unwrap();
        assert_eq!(k.leader(), "/tandem/prod-1/leader");
        assert_eq!(k.member("s1"), "/tandem/prod-1/members/s1");
        assert!(k.member("s1").starts_with(&k.members()));
        for bad in ["", "a/b", "..", ".x", "a b", &"x".repeat(129)] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_name_the_key() {
        let l = LeaderRecord {
            name: "p".into(),
            epoch: 3,
            state: LeaderState::Promoting,
            address: None,
            env_id: Some("e".into()),
            unix_ms: 1,
        };
        let back: LeaderRecord = decode("k", &encode(&l)).unwrap();
        assert_eq!(back, l);
        let e = decode::<LeaderRecord>("/tandem/c/leader", b"{nope").unwrap_err();
        assert!(e.to_string().contains("/tandem/c/leader"), "{e}");
    }
}
