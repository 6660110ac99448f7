//! The timing rules of automatic failover, checked once at start.
//!
//! Patroni's rule `loop_wait + 2 × retry_timeout ≤ ttl` keeps a short blip
//! from causing a failover: a primary that misses one loop and then one
//! retry of a request still renews its lease before it expires. The fence
//! margin keeps the primary's own clock ahead of etcd's: the primary fences
//! at (send time of the last answered keepalive + ttl − margin), and etcd
//! cannot have expired the lease before the keepalive was even sent, so
//! the old primary stops before any standby can see the leader key go.

use std::time::Duration;

/// Default lease time to live (seconds).
pub const DEFAULT_TTL_SECS: u64 = 10;
/// Default pause between two rounds of the coordination loop (milliseconds).
pub const DEFAULT_LOOP_WAIT_MS: u64 = 2_000;
/// Default bound on one etcd request (milliseconds).
pub const DEFAULT_RETRY_TIMEOUT_MS: u64 = 3_000;
/// Default fence margin (milliseconds).
pub const DEFAULT_FENCE_MARGIN_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Time to live of the leases (the leader key and members' records).
    pub ttl: Duration,
    /// Pause between two rounds: keepalives, publishing, watching.
    pub loop_wait: Duration,
    /// Bound on one etcd request; a request that takes longer counts as failed.
    pub retry_timeout: Duration,
    /// How much earlier than etcd could expire the lease the primary fences.
    pub fence_margin: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(DEFAULT_TTL_SECS),
            loop_wait: Duration::from_millis(DEFAULT_LOOP_WAIT_MS),
            retry_timeout: Duration::from_millis(DEFAULT_RETRY_TIMEOUT_MS),
            fence_margin: Duration::from_millis(DEFAULT_FENCE_MARGIN_MS),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("the lease ttl must be a whole number of seconds, at least 2 (got {0:?})")]
    BadTtl(Duration),
    #[error("loop wait and retry timeout must be above zero")]
    Zero,
    #[error(
        "timing rule broken: loop_wait ({loop_wait:?}) + 2 × retry_timeout ({retry_timeout:?}) = {sum:?} exceeds the ttl ({ttl:?}); a blip that short would cost the primary its lease. Raise --etcd-ttl-secs or lower the others"
    )]
    Rule {
        loop_wait: Duration,
        retry_timeout: Duration,
        sum: Duration,
        ttl: Duration,
    },
    #[error(
        "the fence margin ({margin:?}) must be above zero and below the retry timeout ({retry_timeout:?}): the primary must keep renewing until close to the end of its lease, yet fence before etcd can expire it"
    )]
    Margin {
        margin: Duration,
        retry_timeout: Duration,
    },
}

impl Timing {
    /// The timing the `--etcd-*` flags (or their TOML keys) ask for, each
    /// missing one at its default, checked against the rules.
    pub fn from_flags(
        ttl_secs: Option<u64>,
        loop_wait_ms: Option<u64>,
        retry_timeout_ms: Option<u64>,
        fence_margin_ms: Option<u64>,
    ) -> Result<Self, TimingError> {
        let timing = Self {
            ttl: Duration::from_secs(ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
            loop_wait: Duration::from_millis(loop_wait_ms.unwrap_or(DEFAULT_LOOP_WAIT_MS)),
            retry_timeout: Duration::from_millis(
                retry_timeout_ms.unwrap_or(DEFAULT_RETRY_TIMEOUT_MS),
            ),
            fence_margin: Duration::from_millis(fence_margin_ms.unwrap_or(DEFAULT_FENCE_MARGIN_MS)),
        };
        timing.validate()?;
        Ok(timing)
    }

    /// Checks the rules; a timing that breaks them is refused at start.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.ttl.subsec_nanos() != 0 || self.ttl < Duration::from_secs(2) {
            return Err(TimingError::BadTtl(self.ttl));
        }
        if self.loop_wait.is_zero() || self.retry_timeout.is_zero() {
            return Err(TimingError::Zero);
        }
        let sum = self.loop_wait + 2 * self.retry_timeout;
        if sum > self.ttl {
            return Err(TimingError::Rule {
                loop_wait: self.loop_wait,
                retry_timeout: self.retry_timeout,
                sum,
                ttl: self.ttl,
            });
        }
        if self.fence_margin.is_zero() || self.fence_margin >= self.retry_timeout {
            return Err(TimingError::Margin {
                margin: self.fence_margin,
                retry_timeout: self.retry_timeout,
            });
        }
        Ok(())
    }

    /// The ttl in whole seconds, as etcd grants leases.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs() as i64
    }

    /// How long after sending a keepalive that etcd answered the primary
    /// may still act as primary.
    pub fn fence_after(&self) -> Duration {
        self.ttl - self.fence_margin
    }

    /// How often the lease is renewed: a third of the ttl, at most the
    /// loop wait, so two renewals can fail before the fence.
    pub fn keepalive_interval(&self) -> Duration {
        self.loop_wait.min(self.ttl / 3)
    }
}

/// The `--etcd-*` timing flags, the same on the primary and the standby
/// (flattened into both; each is also a TOML key of the same name). The
/// help states each default, which a test checks against the constants.
#[derive(clap::Args, serde::Serialize, serde::Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct TimingArgs {
    /// Lease time to live, in seconds: a primary that cannot renew for this
    /// long is replaced. Must satisfy loop_wait + 2 × retry_timeout ≤ ttl
    /// [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_ttl_secs: Option<u64>,
    /// Pause between rounds of renewing, publishing and watching, in ms
    /// [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_loop_wait_ms: Option<u64>,
    /// Bound on one etcd request, in ms [default: 3000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_retry_timeout_ms: Option<u64>,
    /// A primary (this one, or this standby once promoted) fences this long
    /// before etcd could expire its lease, counted from the send time of
    /// the last renewal etcd answered, in ms [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_fence_margin_ms: Option<u64>,
}

impl TimingArgs {
    /// The timing these flags ask for ([`Timing::from_flags`]).
    pub fn timing(&self) -> Result<Timing, TimingError> {
        Timing::from_flags(
            self.etcd_ttl_secs,
            self.etcd_loop_wait_ms,
            self.etcd_retry_timeout_ms,
            self.etcd_fence_margin_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timing_flags_help_states_the_defaults() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            timing: TimingArgs,
        }
        let help = Cli::command().render_long_help().to_string();
        for (flag, value) in [
            ("--etcd-ttl-secs", DEFAULT_TTL_SECS),
            ("--etcd-loop-wait-ms", DEFAULT_LOOP_WAIT_MS),
            ("--etcd-retry-timeout-ms", DEFAULT_RETRY_TIMEOUT_MS),
            ("--etcd-fence-margin-ms", DEFAULT_FENCE_MARGIN_MS),
        ] {
            let text: String = help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(flag))
                .take_while(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                text.contains(&format!("[default: {value}]")),
                "{flag}: the help must say [default: {value}]: {text}"
            );
        }
        let none = Cli::try_parse_from(["t"]).expect("no flags");
        assert_eq!(none.timing.timing(), Ok(Timing::default()));
    }

    fn t(ttl: u64, loop_ms: u64, retry_ms: u64, margin_ms: u64) -> Timing {
        Timing {
            ttl: Duration::from_secs(ttl),
            loop_wait: Duration::from_millis(loop_ms),
            retry_timeout: Duration::from_millis(retry_ms),
            fence_margin: Duration::from_millis(margin_ms),
        }
    }

    #[test]
    fn defaults_keep_the_rule() {
        Timing::default().validate().unwrap();
        let d = Timing::default();
        assert_eq!(d.fence_after(), Duration::from_secs(9));
        assert_eq!(d.keepalive_interval(), Duration::from_secs(2));
    }

    #[test]
    fn the_rule_is_enforced_at_its_edge() {
        t(4, 1000, 1500, 500).validate().unwrap();
        assert!(matches!(
            t(4, 1001, 1500, 500).validate(),
            Err(TimingError::Rule { .. })
        ));
        assert!(matches!(
            t(1, 100, 100, 50).validate(),
            Err(TimingError::BadTtl(_))
        ));
        assert_eq!(t(4, 0, 1000, 500).validate(), Err(TimingError::Zero));
        assert!(matches!(
            t(4, 1000, 1000, 1000).validate(),
            Err(TimingError::Margin { .. })
        ));
        assert!(matches!(
            t(4, 1000, 1000, 0).validate(),
            Err(TimingError::Margin { .. })
        ));
        let mut sub = t(4, 1000, 1000, 500);
        sub.ttl = Duration::from_millis(4500);
        assert!(matches!(sub.validate(), Err(TimingError::BadTtl(_))));
    }

    #[test]
    fn the_error_says_what_to_change() {
        let e = t(5, 2000, 3000, 500).validate().unwrap_err().to_string();
        assert!(e.contains("exceeds the ttl"), "{e}");
        assert!(e.contains("--etcd-ttl-secs"), "{e}");
    }
}
