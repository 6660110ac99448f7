//! Pause points for the failover tests: a daemon stops at a named point so
//! a test can break the world there (stop etcd, kill -9 the daemon), then
//! lets it go on. Only in a build with the cargo feature `test-hooks`
//! (what scripts/test builds); otherwise [`pause`] does nothing.
//!
//! With `TANDEM_TEST_PAUSE_AT=POINT[,POINT...]` and `TANDEM_TEST_PAUSE_DIR=DIR`
//! set, reaching POINT creates `DIR/POINT.paused` and waits until
//! `DIR/POINT.resume` exists. Points: `before-take-over` (a switchover's
//! target, after the primary confirmed, before the leader key moves),
//! `lose-take-over-answer` (the take-over succeeded; its answer is then
//! treated as lost), `before-serve` (promoted, before `tandem-primary`
//! starts).
//!
//! One point does not pause but changes behaviour while armed:
//! `hold-member-record` (a standby under `--etcd`, once a member record
//! of a recoverable base is out, does not publish its position again
//! while its last look at etcd showed a leader key, so its record goes
//! stale while it keeps receiving log; the publish after it first sees
//! the key gone goes out as always). tests/tests/failover_settled.rs uses it to make
//! the standby further ahead show etcd a shorter position than a peer's.
//!
//! Hold points ([`hold`]) stop one subject while the test keeps
//! `DIR/POINT.SUBJECT.hold`, and say where they stopped in
//! `DIR/POINT.SUBJECT.held`: `hold-ship` (the primary sends no log chunk
//! to the standby named SUBJECT, heartbeats go on; `.held` holds the log
//! position everything before which was sent), a link to one standby cut
//! while the others' go on, which a proxy cannot do under etcd: every
//! standby follows the one address the primary advertises.

/// Whether the test asked to pause at `point` (always false without the
/// feature).
pub fn armed(point: &str) -> bool {
    cfg!(feature = "test-hooks")
        && std::env::var("TANDEM_TEST_PAUSE_AT").is_ok_and(|v| v.split(',').any(|p| p == point))
}

/// Waits at `point` while a test holds it (see the module docs).
pub async fn pause(point: &str) {
    if !armed(point) {
        return;
    }
    let Some(dir) = std::env::var_os("TANDEM_TEST_PAUSE_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::write(dir.join(format!("{point}.paused")), b"");
    tracing::warn!(point, "TEST HOOK: paused");
    while !dir.join(format!("{point}.resume")).exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(point, "TEST HOOK: resumed");
}

/// Waits while the test keeps `DIR/POINT.SUBJECT.hold` (see the module
/// docs), after writing `at` to `DIR/POINT.SUBJECT.held`.
pub async fn hold(point: &str, subject: &str, at: impl std::fmt::Display) {
    if !armed(point) {
        return;
    }
    let Some(dir) = std::env::var_os("TANDEM_TEST_PAUSE_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let flag = dir.join(format!("{point}.{subject}.hold"));
    if !flag.exists() {
        return;
    }
    let _ = std::fs::write(dir.join(format!("{point}.{subject}.held")), at.to_string());
    tracing::warn!(point, subject, %at, "TEST HOOK: holding");
    while flag.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(point, subject, "TEST HOOK: released");
}
