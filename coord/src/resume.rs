//! A promotion that etcd already made but the standby did not finish:
//! when it may go on and serve. Pure functions of what etcd holds, with
//! unit tests for every refusal.
//!
//! Two ways to get here:
//! - the target of a switchover sent the take-over transaction, lost its
//!   answer (etcd went away mid-request) and gave up with its directory
//!   unchanged; etcd later shows the leader key on this standby's own
//!   lease at the next epoch ([`taken_over`]): the take-over happened, and
//!   only this standby can finish it;
//! - a standby promoted (after an election or a switchover) and died
//!   before it served; restarted with `run --etcd` on its promoted
//!   directory, it may serve only while etcd still holds its epoch, taken
//!   by itself, and nobody else holds the leader key ([`may_serve`]).

use crate::policy::ClusterView;
use crate::records::LeaderState;

/// The leader key names `name` at `my_epoch + 1`, promoting, on `my_lease`:
/// a take-over this standby sent succeeded though it never learnt it.
pub fn taken_over(
    view: &ClusterView,
    leader_lease: i64,
    name: &str,
    my_epoch: u64,
    my_lease: i64,
) -> bool {
    view.leader.as_ref().is_some_and(|l| {
        l.name == name
            && l.epoch == my_epoch + 1
            && l.state == LeaderState::Promoting
            && leader_lease == my_lease
            && my_lease != 0
    })
}

/// Whether a directory promoted to `promoted_epoch` may serve as `name`:
/// Err says why not (the caller refuses, nothing changed).
pub fn may_serve(view: &ClusterView, name: &str, promoted_epoch: u64) -> Result<(), String> {
    let Some(e) = &view.epoch else {
        return Err("etcd holds no epoch for this cluster (a new or emptied cluster): start `tandem-primary run --etcd` on this directory by hand if it is to serve".into());
    };
    if e.epoch > promoted_epoch {
        return Err(format!(
            "etcd holds epoch {} (taken by {}), newer than this directory's promoted epoch {promoted_epoch}: another standby was promoted past it. It must not serve; rebuild it as a standby of the new primary (docs/runbooks.md, rejoin)",
            e.epoch, e.name
        ));
    }
    if e.epoch < promoted_epoch {
        return Err(format!(
            "this directory was promoted to epoch {promoted_epoch} outside etcd, which holds epoch {} (taken by {}): if it is to serve, start `tandem-primary run --etcd` on it by hand",
            e.epoch, e.name
        ));
    }
    if e.name != name {
        return Err(format!(
            "etcd's epoch {} was taken by {}, not by {name}: another standby took this epoch; this directory must not serve",
            e.epoch, e.name
        ));
    }
    if let Some(l) = view
        .leader
        .as_ref()
        .filter(|l| l.name != name || l.epoch != promoted_epoch)
    {
        return Err(format!(
            "the leader key is held by {} (epoch {}): another primary serves this cluster",
            l.name, l.epoch
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{EpochRecord, LeaderRecord};

    fn view(epoch: u64, by: &str, leader: Option<(&str, u64, LeaderState)>) -> ClusterView {
        ClusterView {
            epoch: Some(EpochRecord {
                epoch,
                name: by.into(),
                unix_ms: 0,
            }),
            leader: leader.map(|(name, epoch, state)| LeaderRecord {
                name: name.into(),
                epoch,
                state,
                address: None,
                env_id: None,
                unix_ms: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_promoted_directory_serves_only_while_etcd_holds_its_epoch_for_it() {
        use LeaderState::*;
        // Its own key (the dead process's lease) or none: it finishes.
        assert_eq!(
            may_serve(&view(2, "s1", Some(("s1", 2, Promoting))), "s1", 2),
            Ok(())
        );
        assert_eq!(may_serve(&view(2, "s1", None), "s1", 2), Ok(()));
        for (v, why) in [
            (
                view(3, "s2", None),
                "newer than this directory's promoted epoch 2",
            ),
            (
                view(1, "p", Some(("p", 1, Primary))),
                "promoted to epoch 2 outside etcd",
            ),
            (view(2, "s2", None), "taken by s2, not by s1"),
            (
                view(2, "s1", Some(("s2", 2, Primary))),
                "held by s2 (epoch 2)",
            ),
            (ClusterView::default(), "holds no epoch"),
        ] {
            let e = may_serve(&v, "s1", 2).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_lost_take_over_answer_is_recognised_by_the_lease_and_epoch() {
        use LeaderState::*;
        let v = view(2, "s1", Some(("s1", 2, Promoting)));
        assert!(taken_over(&v, 7, "s1", 1, 7));
        assert!(!taken_over(&v, 8, "s1", 1, 7), "another process's lease");
        assert!(!taken_over(&v, 7, "s2", 1, 7), "another name");
        assert!(!taken_over(&v, 7, "s1", 2, 7), "not the next epoch");
        let serving = view(2, "s1", Some(("s1", 2, Primary)));
        assert!(!taken_over(&serving, 7, "s1", 1, 7));
        assert!(!taken_over(&view(2, "s1", None), 7, "s1", 1, 7));
    }
}
