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
