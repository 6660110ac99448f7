//! Statistics over runs: medians, percentiles, spreads, and the delay of
//! each commit until an acknowledgement covers it.

use super::*;

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of an ascending slice.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// "median (min–max)" of several runs, or the one value.
pub(crate) fn spread(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let m = median(v);
    if v.len() == 1 {
        return format!("{m:.digits$}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

/// One commit: when its line appeared in the workload's `-L` file, and the
/// end of log after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitSeen {
    pub(crate) at: Instant,
    pub(crate) lsn: LogPosition,
}

/// One answer of the primary's Status RPC: the standby's acknowledged
/// (durable) position, as the primary knew it when the answer arrived.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AckSample {
    pub(crate) at: Instant,
    pub(crate) end: LogPosition,
    pub(crate) acked: LogPosition,
}

/// For each commit, the time from its appearance until the first sample at
/// or after it whose position (`pos`: acknowledged, or the primary's end of
/// log) covers it. Both series are in time order and positions only grow,
/// so one forward sweep suffices. Returns the delays in milliseconds and how
/// many commits were never covered.
pub(crate) fn commit_delays(
    commits: &[CommitSeen],
    samples: &[AckSample],
    pos: impl Fn(&AckSample) -> LogPosition,
) -> (Vec<f64>, usize) {
    let mut out = Vec::with_capacity(commits.len());
    let mut unmatched = 0;
    let mut k = 0;
    for c in commits {
        while k < samples.len() && (samples[k].at < c.at || pos(&samples[k]) < c.lsn) {
            k += 1;
        }
        match samples.get(k) {
            Some(s) => out.push(s.at.duration_since(c.at).as_secs_f64() * 1000.0),
            None => unmatched += 1,
        }
    }
    (out, unmatched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(spread(&[1.0, 3.0, 2.0], 1), "2.0 (1.0–3.0)");
    }

    #[test]
    fn each_commit_waits_for_the_first_covering_acknowledgement() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let p = |o: u32| LogPosition::new(1, o);
        let commits = [
            CommitSeen {
                at: ms(0),
                lsn: p(100),
            },
            CommitSeen {
                at: ms(1),
                lsn: p(200),
            },
            CommitSeen {
                at: ms(10),
                lsn: p(300),
            },
        ];
        let samples = [
            AckSample {
                at: ms(2),
                end: p(200),
                acked: p(50),
            },
            AckSample {
                at: ms(3),
                end: p(200),
                acked: p(200),
            },
            // Acknowledged before the commit was seen: counts from its sighting.
            AckSample {
                at: ms(9),
                end: p(400),
                acked: p(300),
            },
            AckSample {
                at: ms(12),
                end: p(400),
                acked: p(400),
            },
        ];
        let (d, unmatched) = commit_delays(&commits, &samples, |s| s.acked);
        assert_eq!(unmatched, 0);
        assert_eq!(d, vec![3.0, 2.0, 2.0]);
        let (d, _) = commit_delays(&commits, &samples, |s| s.end);
        assert_eq!(d, vec![2.0, 1.0, 2.0]);
        let (d, unmatched) = commit_delays(
            &[CommitSeen {
                at: ms(0),
                lsn: LogPosition::new(2, 0),
            }],
            &samples,
            |s| s.acked,
        );
        assert!(d.is_empty());
        assert_eq!(unmatched, 1);
    }
}

/// One histogram of a daemon's metrics page, as the change between two
/// scrapes: the observations in between.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistDelta {
    pub(crate) count: f64,
    /// `(upper bound, cumulative count)`, ascending; the last is +Inf.
    pub(crate) buckets: Vec<(f64, f64)>,
}

impl HistDelta {
    /// The histogram `name` (OpenMetrics `_bucket{le=...}` samples) of
    /// `after` minus `before`; `None` if the page has no such histogram.
    pub(crate) fn between(
        before: &BTreeMap<String, f64>,
        after: &BTreeMap<String, f64>,
        name: &str,
    ) -> Option<Self> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = after
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v - before.get(k).copied().unwrap_or(0.0)))
            })
            .collect();
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let count = buckets.last().map_or(0.0, |b| b.1);
        Some(HistDelta { count, buckets })
    }

    /// The `p`-th percentile, linear inside its bucket; the bucket above
    /// the largest finite bound reads as that bound. NaN when empty.
    pub(crate) fn quantile(&self, p: f64) -> f64 {
        if self.count <= 0.0 {
            return f64::NAN;
        }
        let target = self.count * p / 100.0;
        let mut lower = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= target {
                if le.is_infinite() {
                    return lower.0;
                }
                let width = cum - lower.1;
                let frac = if width > 0.0 {
                    (target - lower.1) / width
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * frac;
            }
            lower = (le, cum);
        }
        lower.0
    }

    /// The upper bound of the highest bucket with an observation: the
    /// largest value is at most this.
    pub(crate) fn max_bound(&self) -> f64 {
        if self.count <= 0.0 {
            return f64::NAN;
        }
        self.buckets
            .iter()
            .find(|(_, cum)| *cum >= self.count)
            .map_or(f64::NAN, |(le, _)| *le)
    }
}

#[cfg(test)]
mod hist_tests {
    use super::*;

    #[test]
    fn a_histogram_delta_gives_its_quantiles() {
        let page = |v: [f64; 4]| -> BTreeMap<String, f64> {
            ["0.001", "0.002", "0.004", "+Inf"]
                .iter()
                .zip(v)
                .map(|(le, n)| (format!("h_bucket{{le=\"{le}\"}}"), n))
                .collect()
        };
        let before = page([1.0, 1.0, 1.0, 1.0]);
        // 10 new observations: 4 ≤ 1 ms, 4 in (1, 2] ms, 2 in (2, 4] ms.
        let after = page([5.0, 9.0, 11.0, 11.0]);
        let d = HistDelta::between(&before, &after, "h").unwrap();
        assert_eq!(d.count, 10.0);
        assert!(
            (d.quantile(50.0) - 0.00125).abs() < 1e-9,
            "{}",
            d.quantile(50.0)
        );
        assert!((d.quantile(100.0) - 0.004).abs() < 1e-9);
        assert_eq!(d.max_bound(), 0.004);
        assert!(HistDelta::between(&before, &after, "other").is_none());
    }
}
