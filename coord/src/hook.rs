//! The operator's commands that failover runs (`--on-fence`,
//! `--on-promote`): through `sh -c`, with what happened in the
//! environment, bounded in time, their exit status logged and returned.

use std::time::Duration;

/// How long a hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` with `env` set; returns its exit status as text
/// ("exit 0", "signal 9", "timed out", "cannot start: ...").
pub async fn run(what: &str, command: &str, env: &[(&str, String)]) -> String {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(command).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let outcome = match cmd.spawn() {
        Err(e) => format!("cannot start: {e}"),
        Ok(mut child) => match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
            Err(_) => {
                let _ = child.kill().await;
                format!(
                    "timed out after {} s and was killed",
                    HOOK_TIMEOUT.as_secs()
                )
            }
            Ok(Err(e)) => format!("cannot wait for it: {e}"),
            Ok(Ok(status)) => describe(status),
        },
    };
    if outcome == "exit 0" {
        tracing::info!(hook = what, %command, outcome, "hook ran");
    } else {
        tracing::error!(hook = what, %command, outcome, "hook failed");
    }
    outcome
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn exit_status_and_environment_reach_the_caller() {
        assert_eq!(super::run("t", "exit 0", &[]).await, "exit 0");
        assert_eq!(
            super::run(
                "t",
                "test \"$WHY\" = cut || exit 3",
                &[("WHY", "cut".into())]
            )
            .await,
            "exit 0"
        );
        assert_eq!(super::run("t", "exit 7", &[]).await, "exit 7");
        assert_eq!(super::run("t", "kill -9 $$", &[]).await, "signal 9");
    }
}
