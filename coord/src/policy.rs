//! Who may promote: a pure function of what etcd holds and what the
//! candidate knows about itself, so every rule is covered by unit tests
//! and the running standby only carries the answer out.
//!
//! A standby may campaign only when all of these hold:
//! 1. the leader key is gone (its lease expired or was revoked);
//! 2. an election happened before (the epoch key exists) and the candidate
//!    has seen exactly its epoch: one behind has not followed the newest
//!    primary, one ahead is a promoted directory; except one behind whose
//!    epoch record names the candidate itself (it took that epoch and died
//!    before its promotion recorded it: it may take it again);
//! 3. it holds a recoverable base;
//! 4. its durable end reaches the durable floor (no commit wait answered
//!    durable is missing from it);
//! 5. the primary's last published end of log is known for that epoch and
//!    the candidate's lag behind it is within the maximum;
//! 6. the positions compared are final: its own and every recoverable
//!    peer's of the same epoch were read after etcd showed the leader key
//!    gone (a record's `leaderless_since` later than the last leader key
//!    the candidate saw). A position read before may still grow: the old
//!    primary ships until it fences, just before its lease expires, and a
//!    peer's record lags its durable end by up to a loop wait. Without
//!    this a peer further ahead could publish a stale, shorter position
//!    and lose the election to a standby behind it (fault campaign,
//!    2026-12-07: 18,612 bytes of log set aside as diverged). A standby
//!    stops following the old primary when it sees the key gone, before it
//!    reads its final position: log still in flight could otherwise land
//!    after the election and carry a loser past the winner
//!    (tests/tests/failover_settled.rs);
//! 7. no other publishing standby of the same epoch is further ahead, or as
//!    far and with a smaller name.
//!
//! Campaigning is not winning: the election transaction (compare the
//! epoch key's mod revision) lets exactly one of several candidates through.

use crate::records::{EpochRecord, FloorRecord, LeaderRecord, MemberRecord, PositionRecord};
use serde::Serialize;
use tandem_shared::LogPosition;

/// What etcd holds, read in one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub leader: Option<LeaderRecord>,
    pub epoch: Option<EpochRecord>,
    pub position: Option<PositionRecord>,
    pub floor: Option<FloorRecord>,
    pub members: Vec<MemberRecord>,
}

/// The standby asking, as it knows itself now (fresher than its record).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub epoch: u64,
    pub durable: LogPosition,
    pub recoverable: bool,
    pub max_lag_bytes: u64,
    /// The revision at which this standby first found the leader key gone,
    /// in a round before the one that read `durable` (None: it has not, or
    /// a leader was seen since).
    pub leaderless_since: Option<i64>,
    /// The mod revision of the last leader key this standby saw (0: none).
    pub last_leader_rev: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Try the election transaction for `new_epoch`.
    Campaign {
        new_epoch: u64,
        lag_bytes: u64,
    },
    Wait(WaitReason),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum WaitReason {
    LeaderPresent {
        name: String,
    },
    NoElectionYet,
    EpochMismatch {
        etcd: u64,
        mine: u64,
    },
    NotRecoverable,
    BelowFloor {
        floor: LogPosition,
        durable: LogPosition,
    },
    NoPosition,
    LagTooLarge {
        lag_bytes: u64,
        max_bytes: u64,
    },
    BehindPeer {
        peer: String,
        durable: LogPosition,
    },
    /// This standby's position was read before it saw the leader key gone.
    Settling,
    /// A peer's published position predates the vacancy.
    PeerNotSettled {
        peer: String,
    },
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaderPresent { name } => write!(f, "the leader key is held by {name}"),
            Self::NoElectionYet => write!(f, "no primary ever registered in this cluster"),
            Self::EpochMismatch { etcd, mine } => write!(
                f,
                "etcd's epoch is {etcd} and this standby's is {mine}: it did not follow the newest primary"
            ),
            Self::NotRecoverable => write!(f, "this standby holds no recoverable base"),
            Self::BelowFloor { floor, durable } => write!(
                f,
                "a commit wait was answered durable up to {floor}, and this standby holds only {durable}"
            ),
            Self::NoPosition => write!(f, "the primary of this epoch never published its end of log"),
            Self::LagTooLarge { lag_bytes, max_bytes } => write!(
                f,
                "this standby is {lag_bytes} bytes behind the primary's last end of log (--failover-max-lag-bytes {max_bytes})"
            ),
            Self::BehindPeer { peer, durable } => {
                write!(f, "standby {peer} is further ahead or first by name (durable {durable})")
            }
            Self::Settling => write!(
                f,
                "the leader key just went: reading this standby's final position first"
            ),
            Self::PeerNotSettled { peer } => write!(
                f,
                "standby {peer} has not published its position since the leader key went (it may be further ahead)"
            ),
        }
    }
}

/// Decides whether `me` may campaign.
pub fn decide(view: &ClusterView, me: &Candidate) -> Verdict {
    use WaitReason::*;
    let wait = Verdict::Wait;
    if let Some(l) = &view.leader {
        return wait(LeaderPresent {
            name: l.name.clone(),
        });
    }
    let Some(epoch) = &view.epoch else {
        return wait(NoElectionYet);
    };
    // This standby took etcd's epoch itself and its promotion stopped
    // before it recorded one (it died after winning an election or taking
    // a switchover over): nobody else holds that epoch, so it may take it
    // again; every other standby waits.
    let retake = epoch.epoch == me.epoch + 1 && epoch.name == me.name;
    if epoch.epoch != me.epoch && !retake {
        return wait(EpochMismatch {
            etcd: epoch.epoch,
            mine: me.epoch,
        });
    }
    if !me.recoverable {
        return wait(NotRecoverable);
    }
    if let Some(f) = view.floor.filter(|f| me.durable < f.floor) {
        return wait(BelowFloor {
            floor: f.floor,
            durable: me.durable,
        });
    }
    let Some(pos) = view.position.filter(|p| p.epoch == me.epoch) else {
        return wait(NoPosition);
    };
    let lag_bytes = me.durable.bytes_until(pos.end, pos.lg_max);
    if lag_bytes > me.max_lag_bytes {
        return wait(LagTooLarge {
            lag_bytes,
            max_bytes: me.max_lag_bytes,
        });
    }
    let settled = |since: Option<i64>| since.is_some_and(|r| r > me.last_leader_rev);
    if !settled(me.leaderless_since) {
        return wait(Settling);
    }
    let peers = || {
        view.members
            .iter()
            .filter(|m| m.name != me.name && m.epoch == me.epoch && m.recoverable)
    };
    if let Some(peer) = peers().find(|m| !settled(m.leaderless_since)) {
        return wait(PeerNotSettled {
            peer: peer.name.clone(),
        });
    }
    // Ahead = further durable end, then the smaller name.
    let rank = |durable: LogPosition, name: &str| (durable, std::cmp::Reverse(name.to_owned()));
    let mine = rank(me.durable, &me.name);
    if let Some(peer) = peers().find(|m| rank(m.durable, &m.name) > mine) {
        return wait(BehindPeer {
            peer: peer.name.clone(),
            durable: peer.durable,
        });
    }
    Verdict::Campaign {
        new_epoch: me.epoch + 1,
        lag_bytes,
    }
}

#[cfg(test)]
mod retake_tests {
    use super::*;

    #[test]
    fn only_the_standby_that_took_the_epoch_may_take_it_again() {
        let v = ClusterView {
            epoch: Some(EpochRecord {
                epoch: 3,
                name: "a".into(),
                unix_ms: 0,
            }),
            position: Some(PositionRecord {
                epoch: 2,
                end: LogPosition::new(3, 1000),
                lg_max: 10_000,
                unix_ms: 0,
            }),
            ..Default::default()
        };
        let me = |name: &str| Candidate {
            name: name.into(),
            epoch: 2,
            durable: LogPosition::new(3, 1000),
            recoverable: true,
            max_lag_bytes: 0,
            leaderless_since: Some(1),
            last_leader_rev: 0,
        };
        assert_eq!(
            decide(&v, &me("a")),
            Verdict::Campaign {
                new_epoch: 3,
                lag_bytes: 0
            }
        );
        assert_eq!(
            decide(&v, &me("b")),
            Verdict::Wait(WaitReason::EpochMismatch { etcd: 3, mine: 2 })
        );
        // Two epochs ahead is never this standby's own.
        let ahead = Candidate {
            epoch: 1,
            ..me("a")
        };
        assert!(matches!(decide(&v, &ahead), Verdict::Wait(_)));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::records::LeaderState;

    pub(crate) fn p(file: u32, offset: u32) -> LogPosition {
        LogPosition::new(file, offset)
    }

    pub(crate) fn member(
        name: &str,
        epoch: u64,
        durable: LogPosition,
        recoverable: bool,
    ) -> MemberRecord {
        MemberRecord {
            name: name.into(),
            epoch,
            durable,
            recoverable,
            unix_ms: 0,
            leaderless_since: Some(SETTLED),
        }
    }

    /// A vacancy seen after the last leader key of these tests ([`LAST_LEADER`]).
    pub(crate) const SETTLED: i64 = 20;
    pub(crate) const LAST_LEADER: i64 = 10;

    fn view() -> ClusterView {
        ClusterView {
            leader: None,
            epoch: Some(EpochRecord {
                epoch: 2,
                name: "p".into(),
                unix_ms: 0,
            }),
            position: Some(PositionRecord {
                epoch: 2,
                end: p(3, 1000),
                lg_max: 10_000,
                unix_ms: 0,
            }),
            floor: None,
            members: vec![member("b", 2, p(3, 900), true)],
        }
    }

    fn me(name: &str, durable: LogPosition) -> Candidate {
        Candidate {
            name: name.into(),
            epoch: 2,
            durable,
            recoverable: true,
            max_lag_bytes: 500,
            leaderless_since: Some(SETTLED),
            last_leader_rev: LAST_LEADER,
        }
    }

    fn reason(v: Verdict) -> WaitReason {
        match v {
            Verdict::Wait(r) => r,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn the_most_caught_up_standby_campaigns_for_the_next_epoch() {
        assert_eq!(
            decide(&view(), &me("a", p(3, 950))),
            Verdict::Campaign {
                new_epoch: 3,
                lag_bytes: 50
            }
        );
    }

    #[test]
    fn a_present_leader_stops_everyone_whatever_else_holds() {
        let mut v = view();
        v.leader = Some(LeaderRecord {
            name: "p".into(),
            epoch: 2,
            state: LeaderState::Primary,
            address: None,
            env_id: None,
            unix_ms: 0,
        });
        assert!(matches!(
            reason(decide(&v, &me("a", p(3, 1000)))),
            WaitReason::LeaderPresent { .. }
        ));
        v.leader.as_mut().unwrap().state = LeaderState::Promoting;
        assert!(matches!(
            reason(decide(&v, &me("a", p(3, 1000)))),
            WaitReason::LeaderPresent { .. }
        ));
    }

    #[test]
    fn no_election_without_an_epoch_key() {
        let mut v = view();
        v.epoch = None;
        assert_eq!(
            reason(decide(&v, &me("a", p(3, 1000)))),
            WaitReason::NoElectionYet
        );
    }

    #[test]
    fn a_standby_of_another_epoch_never_campaigns() {
        for mine in [1, 3] {
            let c = Candidate {
                epoch: mine,
                ..me("a", p(3, 1000))
            };
            assert_eq!(
                reason(decide(&view(), &c)),
                WaitReason::EpochMismatch { etcd: 2, mine }
            );
        }
    }

    #[test]
    fn an_unrecoverable_standby_never_campaigns() {
        let c = Candidate {
            recoverable: false,
            ..me("a", p(3, 1000))
        };
        assert_eq!(reason(decide(&view(), &c)), WaitReason::NotRecoverable);
    }

    #[test]
    fn the_durable_floor_is_inclusive_and_wins_over_lag() {
        let mut v = view();
        v.floor = Some(FloorRecord {
            epoch: 2,
            floor: p(3, 960),
            unix_ms: 0,
        });
        assert!(matches!(
            reason(decide(&v, &me("a", p(3, 959)))),
            WaitReason::BelowFloor { .. }
        ));
        assert!(matches!(
            decide(&v, &me("a", p(3, 960))),
            Verdict::Campaign { .. }
        ));
        // Even a lag allowance of everything does not lift the floor.
        let c = Candidate {
            max_lag_bytes: u64::MAX,
            ..me("a", p(2, 0))
        };
        assert!(matches!(
            reason(decide(&v, &c)),
            WaitReason::BelowFloor { .. }
        ));
    }

    #[test]
    fn lag_is_measured_against_this_epochs_position_across_files() {
        let mut v = view();
        v.members.clear();
        // 9_900 bytes left in file 2, then 1000 in file 3.
        assert_eq!(
            reason(decide(&v, &me("a", p(2, 100)))),
            WaitReason::LagTooLarge {
                lag_bytes: 10_900,
                max_bytes: 500
            }
        );
        assert!(matches!(
            decide(&v, &me("a", p(3, 500))),
            Verdict::Campaign { lag_bytes: 500, .. }
        ));
        v.position.as_mut().unwrap().epoch = 1;
        assert_eq!(
            reason(decide(&v, &me("a", p(3, 1000)))),
            WaitReason::NoPosition
        );
        v.position = None;
        assert_eq!(
            reason(decide(&v, &me("a", p(3, 1000)))),
            WaitReason::NoPosition
        );
    }

    #[test]
    fn a_standby_ahead_of_the_published_end_has_no_lag() {
        assert!(matches!(
            decide(&view(), &me("a", p(3, 2000))),
            Verdict::Campaign { lag_bytes: 0, .. }
        ));
    }

    #[test]
    fn the_furthest_peer_wins_and_ties_go_to_the_smaller_name() {
        let mut v = view();
        v.members = vec![member("b", 2, p(3, 950), true)];
        // Behind b.
        assert!(matches!(
            reason(decide(&v, &me("a", p(3, 900)))),
            WaitReason::BehindPeer { .. }
        ));
        // Tie: a < b, so a goes and b waits.
        assert!(matches!(
            decide(&v, &me("a", p(3, 950))),
            Verdict::Campaign { .. }
        ));
        v.members = vec![member("a", 2, p(3, 950), true)];
        assert_eq!(
            reason(decide(&v, &me("b", p(3, 950)))),
            WaitReason::BehindPeer {
                peer: "a".into(),
                durable: p(3, 950)
            }
        );
    }

    #[test]
    fn peers_that_could_not_win_do_not_block() {
        let mut v = view();
        v.members = vec![
            member("a", 2, p(3, 999), false),
            member("b", 1, p(3, 999), true),
            member("c", 3, p(3, 999), true),
        ];
        assert!(matches!(
            decide(&v, &me("d", p(3, 900))),
            Verdict::Campaign { .. }
        ));
    }

    #[test]
    fn my_own_stale_record_is_ignored() {
        let mut v = view();
        v.members = vec![member("a", 2, p(3, 999), true)];
        assert!(matches!(
            decide(&v, &me("a", p(3, 900))),
            Verdict::Campaign { .. }
        ));
    }

    #[test]
    fn a_position_read_before_the_leader_key_went_waits_a_round() {
        for since in [None, Some(LAST_LEADER - 1), Some(LAST_LEADER)] {
            let c = Candidate {
                leaderless_since: since,
                ..me("a", p(3, 1000))
            };
            assert_eq!(
                reason(decide(&view(), &c)),
                WaitReason::Settling,
                "{since:?}"
            );
        }
    }

    /// The fault campaign's case: the peer further ahead last published
    /// while the old primary still shipped, so its record shows less than
    /// it holds. It must not lose to a standby behind it.
    #[test]
    fn a_peer_whose_record_predates_the_vacancy_blocks_until_it_publishes_again() {
        let mut v = view();
        for stale in [None, Some(LAST_LEADER - 5)] {
            v.members = vec![MemberRecord {
                leaderless_since: stale,
                ..member("b", 2, p(3, 900), true)
            }];
            assert_eq!(
                reason(decide(&v, &me("a", p(3, 950)))),
                WaitReason::PeerNotSettled { peer: "b".into() }
            );
        }
        // b publishes its final position: ahead, so it goes and a waits.
        v.members = vec![member("b", 2, p(3, 990), true)];
        assert!(matches!(
            reason(decide(&v, &me("a", p(3, 950)))),
            WaitReason::BehindPeer { .. }
        ));
        assert!(matches!(
            decide(
                &v,
                &Candidate {
                    leaderless_since: Some(SETTLED),
                    ..me("b", p(3, 990))
                }
            ),
            Verdict::Campaign { .. }
        ));
        // A peer that could not win anyway does not need to settle.
        v.members = vec![MemberRecord {
            leaderless_since: None,
            ..member("b", 2, p(3, 990), false)
        }];
        assert!(matches!(
            decide(&v, &me("a", p(3, 950))),
            Verdict::Campaign { .. }
        ));
    }

    /// Exhaustive over small worlds: whatever the positions and names, at
    /// most one of the publishing standbys may campaign, and when one may,
    /// it is the furthest one (first by name).
    #[test]
    fn at_most_one_candidate_among_standbys_that_see_the_same_view() {
        let positions = [p(3, 0), p(3, 500), p(3, 950), p(3, 1000)];
        let names = ["a", "b", "c"];
        for i in 0..positions.len() {
            for j in 0..positions.len() {
                for k in 0..positions.len() {
                    for rec in 0..8u8 {
                        let mut v = view();
                        v.members = names
                            .iter()
                            .zip([i, j, k])
                            .enumerate()
                            .map(|(n, (name, x))| {
                                member(name, 2, positions[x], rec & (1 << n) != 0)
                            })
                            .collect();
                        let campaigning: Vec<&MemberRecord> = v
                            .members
                            .iter()
                            .filter(|m| {
                                let c = Candidate {
                                    recoverable: m.recoverable,
                                    ..me(&m.name, m.durable)
                                };
                                matches!(decide(&v, &c), Verdict::Campaign { .. })
                            })
                            .collect();
                        assert!(campaigning.len() <= 1, "{campaigning:?}");
                        if let Some(w) = campaigning.first() {
                            assert!(v.members.iter().filter(|m| m.recoverable).all(|m| {
                                (m.durable, std::cmp::Reverse(&m.name))
                                    <= (w.durable, std::cmp::Reverse(&w.name))
                            }));
                        }
                    }
                }
            }
        }
    }
}
