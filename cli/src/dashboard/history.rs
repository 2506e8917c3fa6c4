//! The lag history the dashboard's chart draws: per group, the lag of each
//! partition at every refresh over the last minutes, in memory only.
//!
//! It owns the bounded ring of samples and the chart's JSON shape; it does
//! not read the broker (the refresh hands it what it saw).

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// One refresh's lags of one group: `(topic, partition) → lag`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    at_ms: u64,
    lags: BTreeMap<(String, u32), u64>,
}

/// The lag of every group's partitions over a window (10 minutes by
/// default), at most `max_samples` samples a group: older ones drop.
#[derive(Debug, Clone)]
pub struct LagHistory {
    window_ms: u64,
    max_samples: usize,
    groups: BTreeMap<String, VecDeque<Sample>>,
}

/// One line of a group's chart: a partition's lag at each of the chart's
/// times (`None` where the partition was not reported then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Series {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// Lag at each time of [`Chart::t`].
    pub lag: Vec<Option<u64>>,
}

/// A group's lag over the window, as the page draws it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Chart {
    /// Sample times, milliseconds since the epoch, oldest first.
    pub t: Vec<u64>,
    /// Total lag at each time.
    pub total: Vec<u64>,
    /// One line per partition, in topic and partition order.
    pub series: Vec<Series>,
}

/// The most samples a group keeps, whatever the window and interval.
const MAX_SAMPLES: usize = 10_000;

impl LagHistory {
    /// A history over `window`, sampled about every `interval`.
    pub fn new(window: Duration, interval: Duration) -> Self {
        let interval_ms = interval.as_millis().max(1);
        let per_window = window.as_millis() / interval_ms + 1;
        LagHistory {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max_samples: usize::try_from(per_window)
                .unwrap_or(MAX_SAMPLES)
                .clamp(2, MAX_SAMPLES),
            groups: BTreeMap::new(),
        }
    }

    /// Record `group`'s lags seen at `at_ms`, dropping samples older than
    /// the window or beyond the ring's size.
    pub fn record(
        &mut self,
        group: &str,
        at_ms: u64,
        lags: impl IntoIterator<Item = (String, u32, u64)>,
    ) {
        let ring = self.groups.entry(group.to_string()).or_default();
        ring.push_back(Sample {
            at_ms,
            lags: lags.into_iter().map(|(t, p, lag)| ((t, p), lag)).collect(),
        });
        let oldest = at_ms.saturating_sub(self.window_ms);
        while ring.len() > self.max_samples || ring.front().is_some_and(|s| s.at_ms < oldest) {
            ring.pop_front();
        }
    }

    /// Forget the groups not in `live` (deleted since).
    pub fn retain_groups(&mut self, live: &BTreeSet<String>) {
        self.groups.retain(|g, _| live.contains(g));
    }

    /// How many samples `group` has.
    #[cfg(test)]
    fn len(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, VecDeque::len)
    }

    /// `group`'s chart: its samples as aligned series, one per partition
    /// seen in the window.
    pub fn chart(&self, group: &str) -> Chart {
        let Some(ring) = self.groups.get(group) else {
            return Chart::default();
        };
        let keys: BTreeSet<&(String, u32)> = ring.iter().flat_map(|s| s.lags.keys()).collect();
        Chart {
            t: ring.iter().map(|s| s.at_ms).collect(),
            total: ring.iter().map(|s| s.lags.values().sum()).collect(),
            series: keys
                .into_iter()
                .map(|key| Series {
                    topic: key.0.clone(),
                    partition: key.1,
                    lag: ring.iter().map(|s| s.lags.get(key).copied()).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lags(items: &[(&str, u32, u64)]) -> Vec<(String, u32, u64)> {
        items
            .iter()
            .map(|(t, p, l)| (t.to_string(), *p, *l))
            .collect()
    }

    #[test]
    fn the_ring_keeps_the_window_and_no_more() {
        // 10 s at 2 s: 6 samples at most.
        let mut h = LagHistory::new(Duration::from_secs(10), Duration::from_secs(2));
        for i in 0..20u64 {
            h.record("email", i * 2_000, lags(&[("orders", 0, i)]));
        }
        assert_eq!(h.len("email"), 6);
        let chart = h.chart("email");
        assert_eq!(
            chart.t,
            vec![28_000, 30_000, 32_000, 34_000, 36_000, 38_000]
        );
        assert_eq!(chart.series[0].lag.last(), Some(&Some(19)));

        // Samples older than the window drop even when fewer than the ring
        // holds (a refresh that was late).
        h.record("email", 100_000, lags(&[("orders", 0, 1)]));
        assert_eq!(h.len("email"), 1);
    }

    #[test]
    fn the_chart_aligns_partitions_that_come_and_go() {
        let mut h = LagHistory::new(Duration::from_secs(600), Duration::from_secs(2));
        h.record("g", 1, lags(&[("a", 0, 5)]));
        h.record("g", 2, lags(&[("a", 0, 4), ("a", 1, 7)]));
        h.record("g", 3, lags(&[("a", 1, 6)]));
        let chart = h.chart("g");
        assert_eq!(chart.t, vec![1, 2, 3]);
        assert_eq!(chart.total, vec![5, 11, 6]);
        assert_eq!(
            chart.series,
            vec![
                Series {
                    topic: "a".into(),
                    partition: 0,
                    lag: vec![Some(5), Some(4), None],
                },
                Series {
                    topic: "a".into(),
                    partition: 1,
                    lag: vec![None, Some(7), Some(6)],
                },
            ]
        );
        assert_eq!(h.chart("unknown"), Chart::default());
    }

    #[test]
    fn deleted_groups_are_forgotten() {
        let mut h = LagHistory::new(Duration::from_secs(600), Duration::from_secs(2));
        h.record("kept", 1, lags(&[("a", 0, 1)]));
        h.record("gone", 1, lags(&[("a", 0, 1)]));
        h.retain_groups(&BTreeSet::from(["kept".to_string()]));
        assert_eq!(h.len("kept"), 1);
        assert_eq!(h.len("gone"), 0);
    }

    #[test]
    fn odd_settings_still_make_a_bounded_ring() {
        let h = LagHistory::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(h.max_samples, 2);
        let h = LagHistory::new(Duration::from_secs(86_400 * 365), Duration::from_millis(1));
        assert_eq!(h.max_samples, MAX_SAMPLES);
    }
}
