//! Who a planned switchover goes to, and whether it may start: a pure
//! function of what etcd holds, so every refusal is covered by unit tests.
//!
//! A switchover starts only when a primary serves (the leader key is held
//! by a `primary`, not a promoting standby), no other switchover is under
//! way, and the target is a publishing standby of the leader's epoch that
//! holds a recoverable base and is within the lag allowed of the
//! primary's last published end of log. Without a name, the target is the
//! most caught-up such standby (ties: the smaller name), as for elections.

use crate::policy::ClusterView;
use crate::records::{LeaderRecord, LeaderState, MemberRecord, SwitchoverRecord};
/// Why a switchover may not start; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no primary leads this cluster (the leader key is absent): a switchover needs a serving primary; automatic failover handles a dead one")]
    NoLeader,
    #[error(
        "{name} holds the leader key but is still promoting, not serving: wait until it serves"
    )]
    LeaderNotServing { name: String },
    #[error("a switchover to {to} is already under way ({state})")]
    UnderWay { to: String, state: String },
    #[error("{name} is the primary already")]
    TargetIsLeader { name: String },
    #[error("{name} is not a member of this cluster (members publishing now: {members}); is its `tandem-standby run --etcd` running?")]
    NotAMember { name: String, members: String },
    #[error("no standby of this cluster can take over: {0}")]
    NoCandidate(String),
    #[error("{name} is not caught up: {why}")]
    NotCaughtUp { name: String, why: String },
}

/// The standby chosen, and how far behind the primary's published end it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub leader: LeaderRecord,
    pub member: MemberRecord,
    pub lag_bytes: u64,
}

/// Why `m` cannot take over from `leader` now, or its lag.
fn fitness(
    view: &ClusterView,
    leader: &LeaderRecord,
    m: &MemberRecord,
    max_lag: u64,
) -> Result<u64, String> {
    if m.epoch != leader.epoch {
        return Err(format!(
            "it has seen epoch {}, the primary serves epoch {}",
            m.epoch, leader.epoch
        ));
    }
    if !m.recoverable {
        return Err("it holds no recoverable base".into());
    }
    let Some(pos) = view.position.filter(|p| p.epoch == leader.epoch) else {
        return Err("the primary has not published its end of log yet".into());
    };
    let lag = m.durable.bytes_until(pos.end, pos.lg_max);
    if lag > max_lag {
        return Err(format!(
            "{lag} bytes behind the primary's published end of log {} (at most {max_lag}; it holds {})",
            pos.end, m.durable
        ));
    }
    Ok(lag)
}

/// Chooses the target (`to`, or the most caught-up standby). A request
/// past its deadline at `now_unix_ms` (or failed) is not under way: it
/// counts as failed for everyone, and a new request replaces it.
pub fn choose(
    view: &ClusterView,
    under_way: Option<&SwitchoverRecord>,
    to: Option<&str>,
    max_lag_bytes: u64,
    now_unix_ms: u64,
) -> Result<Target, Refusal> {
    let leader = view.leader.clone().ok_or(Refusal::NoLeader)?;
    if leader.state != LeaderState::Primary {
        return Err(Refusal::LeaderNotServing { name: leader.name });
    }
    if let Some(r) = under_way.filter(|r| !r.expired(now_unix_ms)) {
        return Err(Refusal::UnderWay {
            to: r.to.clone(),
            state: format!("{:?}", r.state).to_lowercase(),
        });
    }
    let members: Vec<&MemberRecord> = view
        .members
        .iter()
        .filter(|m| m.name != leader.name)
        .collect();
    let names = || {
        let n: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        if n.is_empty() {
            "none".to_owned()
        } else {
            n.join(", ")
        }
    };
    if let Some(name) = to {
        if name == leader.name {
            return Err(Refusal::TargetIsLeader { name: name.into() });
        }
        let m = members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| Refusal::NotAMember {
                name: name.into(),
                members: names(),
            })?;
        let lag = fitness(view, &leader, m, max_lag_bytes).map_err(|why| Refusal::NotCaughtUp {
            name: name.into(),
            why,
        })?;
        return Ok(Target {
            leader,
            member: (*m).clone(),
            lag_bytes: lag,
        });
    }
    // Furthest durable end first, then the smaller name.
    let mut ranked = members.clone();
    ranked.sort_by(|a, b| b.durable.cmp(&a.durable).then(a.name.cmp(&b.name)));
    let mut why = Vec::new();
    for m in ranked {
        match fitness(view, &leader, m, max_lag_bytes) {
            Ok(lag) => {
                return Ok(Target {
                    leader,
                    member: m.clone(),
                    lag_bytes: lag,
                })
            }
            Err(e) => why.push(format!("{}: {e}", m.name)),
        }
    }
    Err(Refusal::NoCandidate(if why.is_empty() {
        "no standby publishes to etcd (is `tandem-standby run --etcd` running?)".into()
    } else {
        why.join("; ")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{member, p};
    use crate::records::{EpochRecord, PositionRecord, SwitchoverState};

    const NOW: u64 = 1_000;

    fn view() -> ClusterView {
        ClusterView {
            leader: Some(LeaderRecord {
                name: "p".into(),
                epoch: 2,
                state: LeaderState::Primary,
                address: Some("https://p".into()),
                env_id: None,
                unix_ms: 0,
            }),
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
            members: vec![
                member("b", 2, p(3, 1000), true),
                member("a", 2, p(3, 1000), true),
                member("c", 2, p(3, 900), true),
            ],
        }
    }

    #[test]
    fn without_a_name_the_most_caught_up_goes_and_ties_go_to_the_smaller_name() {
        let t = choose(&view(), None, None, 500, NOW).unwrap();
        assert_eq!(t.member.name, "a");
        let mut v = view();
        v.members[2].durable = p(3, 1001);
        assert_eq!(choose(&v, None, None, 500, NOW).unwrap().member.name, "c");
        // The best is unfit: the next one goes.
        v.members[2].recoverable = false;
        assert_eq!(choose(&v, None, None, 500, NOW).unwrap().member.name, "a");
    }

    #[test]
    fn a_named_target_must_be_a_fit_member() {
        assert_eq!(
            choose(&view(), None, Some("c"), 500, NOW)
                .unwrap()
                .lag_bytes,
            100
        );
        let e = choose(&view(), None, Some("zz"), 500, NOW).unwrap_err();
        assert!(
            matches!(&e, Refusal::NotAMember { members, .. } if members == "b, a, c"),
            "{e}"
        );
        let e = choose(&view(), None, Some("c"), 50, NOW).unwrap_err();
        assert!(
            e.to_string()
                .contains("c is not caught up: 100 bytes behind"),
            "{e}"
        );
        assert!(matches!(
            choose(&view(), None, Some("p"), 500, NOW),
            Err(Refusal::TargetIsLeader { .. })
        ));
        let mut v = view();
        v.members[2].epoch = 1;
        let e = choose(&v, None, Some("c"), u64::MAX, NOW).unwrap_err();
        assert!(e.to_string().contains("epoch 1"), "{e}");
        v.position = None;
        assert!(matches!(
            choose(&v, None, Some("a"), 500, NOW),
            Err(Refusal::NotCaughtUp { .. })
        ));
    }

    #[test]
    fn no_switchover_without_a_serving_primary_or_while_one_is_under_way() {
        let mut v = view();
        v.leader.as_mut().unwrap().state = LeaderState::Promoting;
        assert!(matches!(
            choose(&v, None, None, 500, NOW),
            Err(Refusal::LeaderNotServing { .. })
        ));
        v.leader = None;
        assert_eq!(choose(&v, None, None, 500, NOW), Err(Refusal::NoLeader));
        let r = SwitchoverRecord {
            id: "x".into(),
            from: "p".into(),
            to: "b".into(),
            epoch: 2,
            catch_up_timeout_ms: 1,
            state: SwitchoverState::Claimed,
            error: None,
            unix_ms: 0,
            deadline_unix_ms: Some(NOW + 1),
        };
        let e = choose(&view(), Some(&r), None, 500, NOW).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a switchover to b is already under way (claimed)"
        );
        // Past its deadline, or failed, it counts as failed for everyone.
        let stale = SwitchoverRecord {
            deadline_unix_ms: Some(NOW),
            ..r.clone()
        };
        assert_eq!(
            choose(&view(), Some(&stale), None, 500, NOW)
                .unwrap()
                .member
                .name,
            "a"
        );
        let failed = SwitchoverRecord {
            state: SwitchoverState::Failed,
            deadline_unix_ms: None,
            ..r
        };
        assert!(choose(&view(), Some(&failed), None, 500, NOW).is_ok());
        let mut v = view();
        v.members.clear();
        assert!(matches!(
            choose(&v, None, None, 500, NOW),
            Err(Refusal::NoCandidate(_))
        ));
    }
}
