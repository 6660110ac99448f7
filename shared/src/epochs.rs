//! The epoch history: where each promotion began in the log. A promotion
//! keeps the environment's identity and starts a new epoch at the promoted
//! standby's durable end X; the log before X is shared with the previous
//! primary, the log after X is the new primary's alone. A standby that
//! holds no log past the X of the epochs newer than its own holds a
//! prefix of the new primary's history and can continue streaming from it
//! (PostgreSQL's timeline history files are the model).

use crate::wire;
use crate::LogPosition;
use serde::{Deserialize, Serialize};

/// Epoch `epoch` began at `start`; `prev_record_digest` is the blake3 of the
/// last log record before `start` (as in `Hello.last_record_digest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    pub start: LogPosition,
    #[serde(with = "hex_bytes")]
    pub prev_record_digest: Vec<u8>,
}

impl From<&EpochStart> for wire::EpochStart {
    fn from(e: &EpochStart) -> Self {
        Self {
            epoch: e.epoch,
            start: Some(e.start.into()),
            prev_record_digest: e.prev_record_digest.clone().into(),
        }
    }
}

impl From<&wire::EpochStart> for EpochStart {
    fn from(e: &wire::EpochStart) -> Self {
        Self {
            epoch: e.epoch,
            start: e.start.unwrap_or_default().into(),
            prev_record_digest: e.prev_record_digest.to_vec(),
        }
    }
}

impl std::fmt::Display for EpochStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} from {}", self.epoch, self.start)
    }
}

/// Where the log of a holder of `epoch` stops being the current primary's:
/// the earliest start among the epochs after it (a later promotion may
/// have begun before an earlier one's start, from a standby that was
/// behind). A promotion makes the epoch after the highest its standby saw,
/// so epochs follow one another; `None` when the history does not record
/// the one after `epoch` (a promotion by an older Tandem), and then
/// nothing proves where the two logs part.
pub fn parting_point(history: &[EpochStart], epoch: u64) -> Option<&EpochStart> {
    history
        .iter()
        .find(|e| Some(e.epoch) == epoch.checked_add(1))?;
    history
        .iter()
        .filter(|e| e.epoch > epoch)
        .min_by_key(|e| (e.start, e.epoch))
}

/// Why two histories cannot both be true: they give one epoch two starts
/// (two standbys were promoted from the same epoch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("epoch {epoch} began at {ours} in this directory's history but at {theirs} in the primary's: two promotions made the same epoch")]
pub struct HistoryConflict {
    pub epoch: u64,
    pub ours: LogPosition,
    pub theirs: LogPosition,
}

/// Checks that `theirs` agrees with every epoch `ours` knows, and is
/// ordered (epochs rising, starts not falling).
pub fn check_agrees(ours: &[EpochStart], theirs: &[EpochStart]) -> Result<(), HistoryConflict> {
    for o in ours {
        if let Some(t) = theirs.iter().find(|t| t.epoch == o.epoch) {
            if t.start != o.start || t.prev_record_digest != o.prev_record_digest {
                return Err(HistoryConflict {
                    epoch: o.epoch,
                    ours: o.start,
                    theirs: t.start,
                });
            }
        }
    }
    Ok(())
}

/// The epochs both histories know (they agree on each: see
/// [`check_agrees`]), oldest first: a primary that leaves out an epoch
/// never makes a standby forget where it began.
pub fn merge(ours: &[EpochStart], theirs: Vec<EpochStart>) -> Vec<EpochStart> {
    let mut all = theirs;
    for o in ours {
        if !all.iter().any(|t| t.epoch == o.epoch) {
            all.push(o.clone());
        }
    }
    all.sort_by_key(|e| e.epoch);
    all
}

/// One line for logs and status: "2 from [3][1200], 3 from [5][28]".
pub fn describe(history: &[EpochStart]) -> String {
    if history.is_empty() {
        return "none (no promotion yet)".into();
    }
    history
        .iter()
        .map(|e| format!("{} from {}", e.epoch, e.start))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Digests as hex in the JSON state files, so an operator can compare them.
mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::to_hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd-length hex digest"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                s.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| D::Error::custom("invalid hex digest"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: u64, file: u32, offset: u32) -> EpochStart {
        EpochStart {
            epoch,
            start: LogPosition::new(file, offset),
            prev_record_digest: vec![epoch as u8; 32],
        }
    }

    #[test]
    fn the_earliest_later_start_is_where_an_older_holder_stops() {
        let h = [e(2, 3, 100), e(3, 5, 28)];
        assert_eq!(parting_point(&h, 1), Some(&h[0]));
        assert_eq!(parting_point(&h, 2), Some(&h[1]));
        assert_eq!(parting_point(&h, 3), None);
        assert_eq!(
            parting_point(&h[1..], 1),
            None,
            "epoch 2's start is unknown"
        );
        // Epoch 3 was promoted from a standby behind epoch 2's start.
        let h = [e(2, 3, 100), e(3, 3, 60)];
        assert_eq!(parting_point(&h, 1), Some(&h[1]));
    }

    #[test]
    fn histories_that_give_an_epoch_two_starts_conflict() {
        let ours = [e(2, 3, 100)];
        assert!(check_agrees(&ours, &[e(2, 3, 100), e(3, 5, 28)]).is_ok());
        assert!(check_agrees(&ours, &[]).is_ok());
        let c = check_agrees(&ours, &[e(2, 3, 140)]).unwrap_err();
        assert_eq!(c.epoch, 2);
    }

    #[test]
    fn digests_are_stored_as_hex() {
        let json = serde_json::to_string(&e(2, 3, 100)).unwrap();
        assert!(json.contains("\"02020202"), "{json}");
        assert_eq!(
            serde_json::from_str::<EpochStart>(&json).unwrap(),
            e(2, 3, 100)
        );
    }
}
