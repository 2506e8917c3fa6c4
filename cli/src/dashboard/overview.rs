//! What the dashboard shows, as one JSON document (`GET /api/overview`):
//! topics with their partitions' log start and end, groups with members,
//! mode, lag per partition and the lag chart, and each DLQ with its dead
//! letters.
//!
//! It owns reading all that from a broker ([`gather`]) and its JSON shape;
//! it never changes the broker, and it does not decide when to refresh
//! (the server's poller does).

use super::history::{Chart, LagHistory};
use conveyor::dlq::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_FAILED_AT, HEADER_GROUP, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_TOPIC, REDRIVE_GROUP,
};
use conveyor::{
    Broker, DlqPolicy, ErrorKind, GroupConfig, GroupLag, Header, MemberDescription,
    PartitionDescription, PartitionLag, TopicDescription,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Longest value or key preview, in bytes of UTF-8 (cut at a character).
pub const PREVIEW_BYTES: usize = 200;

/// The whole page's data.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overview {
    /// The broker URL, password hidden.
    pub url: String,
    /// The URL's scheme: mmap, postgres, redis...
    pub backend: String,
    /// Whether `POST /api/redrive` is allowed (`--allow-redrive`).
    pub allow_redrive: bool,
    /// How often the server refreshes, in milliseconds.
    pub interval_ms: u64,
    /// When the data below was read, ms since the epoch (`None` before the
    /// first refresh that worked).
    pub refreshed_at: Option<u64>,
    /// Why the last refresh failed (the data below is then from the last
    /// one that worked).
    pub error: Option<String>,
    /// Every topic, sorted by name.
    pub topics: Vec<TopicView>,
    /// Every group but redrive's own, sorted by name.
    pub groups: Vec<GroupView>,
    /// Every DLQ topic: those of the groups' policies that exist, and
    /// other topics named `*.dlq` or redriven from.
    pub dlqs: Vec<DlqView>,
}

/// A topic and its partitions.
#[derive(Debug, Clone, Serialize)]
pub struct TopicView {
    /// Topic name.
    pub topic: String,
    /// Records retained over all partitions.
    pub records: u64,
    /// Bytes stored over all partitions.
    pub bytes: u64,
    /// Whether it is one of [`Overview::dlqs`].
    pub is_dlq: bool,
    /// Per partition: log start, log end, bytes.
    pub partitions: Vec<PartitionDescription>,
}

/// A consumer group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    /// Group name.
    pub group: String,
    /// `stream` or `queue`.
    pub mode: &'static str,
    /// Lag over all partitions.
    pub total_lag: u64,
    /// Queue mode: leased now, over all partitions.
    pub total_in_flight: u64,
    /// Stream mode: the generation.
    pub generation: u64,
    /// Whether `members` is what the group has (an embedded store opened
    /// read-only cannot see the owner's members).
    pub members_visible: bool,
    /// The members now.
    pub members: Vec<MemberDescription>,
    /// Deliveries before a message is dead-lettered, where known.
    pub max_deliveries: Option<u32>,
    /// Per partition: committed, log end, lag, in flight, available.
    pub partitions: Vec<PartitionLag>,
    /// The DLQ topics this group dead-letters to that exist.
    pub dlq_topics: Vec<String>,
    /// Lag over the last minutes.
    pub history: Chart,
}

/// A DLQ topic and the dead letters waiting in it.
#[derive(Debug, Clone, Serialize)]
pub struct DlqView {
    /// The DLQ topic.
    pub topic: String,
    /// The groups whose policy names it.
    pub groups: Vec<String>,
    /// Records retained.
    pub total: u64,
    /// Dead letters not yet redriven or discarded.
    pub waiting: u64,
    /// The first waiting ones (at most the `--dlq-messages` limit).
    pub messages: Vec<DlqMessage>,
    /// Why its messages could not be read (the rest of the page stands).
    pub error: Option<String>,
}

/// One record of a DLQ topic, as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqMessage {
    /// Its partition in the DLQ topic.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// When it was appended to the DLQ, ms since the epoch.
    pub timestamp: u64,
    /// Where it failed: `topic/partition@offset`, if it is a dead letter.
    pub origin: Option<String>,
    /// The group that gave up on it.
    pub group: Option<String>,
    /// Deliveries made.
    pub attempts: Option<u32>,
    /// The last failure's reason (empty when none was given).
    pub error: Option<String>,
    /// When it was dead-lettered, ms since the epoch.
    pub failed_at: Option<u64>,
    /// The key, as text (lossy UTF-8), cut to [`PREVIEW_BYTES`].
    pub key: Option<String>,
    /// The value, as text (lossy UTF-8), cut to [`PREVIEW_BYTES`].
    pub value: String,
    /// Whether `value` was cut.
    pub value_truncated: bool,
    /// Value size in bytes.
    pub value_bytes: usize,
}

/// `bytes` as text for the page: lossy UTF-8, at most `max` bytes (cut at
/// a character boundary), and whether it was cut.
pub fn preview(bytes: &[u8], max: usize) -> (String, bool) {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() <= max {
        return (text, false);
    }
    text.truncate(text.floor_char_boundary(max));
    (text, true)
}

fn header_str<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|h| h.name == name)
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// A DLQ record as the page shows it, from its parts.
pub fn dlq_message(
    partition: u32,
    offset: u64,
    timestamp: u64,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[Header],
) -> DlqMessage {
    let h = |name| header_str(headers, name);
    let origin = h(HEADER_TOPIC).map(|topic| {
        format!(
            "{topic}/{}@{}",
            h(HEADER_PARTITION).unwrap_or("?"),
            h(HEADER_OFFSET).unwrap_or("?")
        )
    });
    let (value_text, value_truncated) = preview(value, PREVIEW_BYTES);
    DlqMessage {
        partition,
        offset,
        timestamp,
        origin,
        group: h(HEADER_GROUP).map(str::to_string),
        attempts: h(HEADER_ATTEMPTS).and_then(|a| a.parse().ok()),
        error: h(HEADER_ERROR).map(str::to_string),
        failed_at: h(HEADER_FAILED_AT).and_then(|a| a.parse().ok()),
        key: key.map(|k| preview(k, PREVIEW_BYTES).0),
        value: value_text,
        value_truncated,
        value_bytes: value.len(),
    }
}

/// Which existing topics are DLQs, and the groups that dead-letter to
/// each: a group's policy names one per topic it reads (its own, or
/// `{topic}.{group}.dlq`); topics named `*.dlq` and those the redrive group
/// reads are DLQs too (a deleted group's DLQ still shows).
pub fn dlq_topics(
    groups: &[(String, Option<DlqPolicy>, Vec<String>)],
    existing: &BTreeSet<String>,
    redriven: &BTreeSet<String>,
) -> BTreeMap<String, Vec<String>> {
    let mut dlqs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (group, policy, topics) in groups {
        let policy = policy.clone().unwrap_or_default();
        for topic in topics {
            let dlq = policy.topic_for(topic, group);
            if existing.contains(&dlq) {
                let of = dlqs.entry(dlq).or_default();
                if !of.contains(group) {
                    of.push(group.clone());
                }
            }
        }
    }
    for topic in existing {
        if topic.ends_with(".dlq") || redriven.contains(topic) {
            dlqs.entry(topic.clone()).or_default();
        }
    }
    dlqs
}

/// What a refresh read, before it is shaped into an [`Overview`].
pub struct Gathered {
    topics: Vec<TopicDescription>,
    groups: Vec<(conveyor::GroupDescription, Vec<String>)>,
    dlqs: Vec<DlqView>,
}

impl Gathered {
    /// Each group's lag per partition, for the history.
    pub fn lags(&self) -> impl Iterator<Item = (&str, Vec<(String, u32, u64)>)> {
        self.groups.iter().map(|(d, _)| {
            (
                d.group.as_str(),
                d.lag
                    .partitions
                    .iter()
                    .map(|p| (p.topic.clone(), p.partition, p.lag))
                    .collect(),
            )
        })
    }

    /// The overview's topics, groups and DLQs (the caller fills in the
    /// rest), with each group's chart from `history`.
    pub fn shape(self, history: &LagHistory, into: &mut Overview) {
        let dlq_names: BTreeSet<&str> = self.dlqs.iter().map(|d| d.topic.as_str()).collect();
        into.topics = self
            .topics
            .iter()
            .map(|t| TopicView {
                topic: t.name.clone(),
                records: t.partitions.iter().map(|p| p.log_end - p.log_start).sum(),
                bytes: t.partitions.iter().map(|p| p.bytes).sum(),
                is_dlq: dlq_names.contains(t.name.as_str()),
                partitions: t.partitions.clone(),
            })
            .collect();
        into.groups = self
            .groups
            .into_iter()
            .map(|(d, dlq_topics)| GroupView {
                mode: d.lag.mode.name(),
                total_lag: d.lag.total_lag(),
                total_in_flight: d.lag.total_in_flight(),
                generation: d.generation,
                members_visible: d.members_visible,
                max_deliveries: d.config.as_ref().map(|c| c.dlq.max_deliveries),
                history: history.chart(&d.group),
                dlq_topics,
                group: d.group,
                members: d.members,
                partitions: d.lag.partitions,
            })
            .collect();
        into.dlqs = self.dlqs;
    }
}

/// Read everything the page shows from `broker`, with at most
/// `dlq_limit` dead letters a DLQ. Topics and groups deleted while it
/// reads are left out; a DLQ whose records cannot be read says so in its
/// entry.
///
/// # Errors
/// The broker's, when listing or describing fails (unreachable, closed).
pub async fn gather(broker: &Arc<dyn Broker>, dlq_limit: usize) -> conveyor::Result<Gathered> {
    let mut topics = Vec::new();
    for name in broker.list_topics().await? {
        match broker.describe_topic(&name).await {
            Ok(d) => topics.push(d),
            Err(e) if e.kind() == ErrorKind::TopicNotFound => {}
            Err(e) => return Err(e),
        }
    }
    let mut groups = Vec::new();
    let mut redrive = None;
    for name in broker.list_groups().await? {
        if name == REDRIVE_GROUP {
            match broker.group_lag(&name).await {
                Ok(lag) => redrive = Some(lag),
                Err(e) if e.kind() == ErrorKind::GroupNotFound => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        match broker.describe_group(&name).await {
            Ok(d) => groups.push(d),
            Err(e) if e.kind() == ErrorKind::GroupNotFound => {}
            Err(e) => return Err(e),
        }
    }
    let existing: BTreeSet<String> = topics.iter().map(|t| t.name.clone()).collect();
    let redriven: BTreeSet<String> = redrive
        .iter()
        .flat_map(|r| r.partitions.iter().map(|p| p.topic.clone()))
        .collect();
    let policies: Vec<(String, Option<DlqPolicy>, Vec<String>)> = groups
        .iter()
        .map(|d| {
            let mut read: Vec<String> = d.lag.partitions.iter().map(|p| p.topic.clone()).collect();
            read.dedup();
            let policy = d.config.as_ref().map(|c: &GroupConfig| c.dlq.clone());
            (d.group.clone(), policy, read)
        })
        .collect();
    let dlq_map = dlq_topics(&policies, &existing, &redriven);
    let mut dlqs = Vec::new();
    for (topic, of) in &dlq_map {
        let Some(d) = topics.iter().find(|t| &t.name == topic) else {
            continue;
        };
        dlqs.push(dlq_view(broker, d, of.clone(), redrive.as_ref(), dlq_limit).await);
    }
    let groups = groups
        .into_iter()
        .map(|d| {
            let mine = dlq_map
                .iter()
                .filter(|(_, of)| of.contains(&d.group))
                .map(|(t, _)| t.clone())
                .collect();
            (d, mine)
        })
        .collect();
    Ok(Gathered {
        topics,
        groups,
        dlqs,
    })
}

/// A DLQ's waiting dead letters: each partition read from the redrive
/// group's position (below it, all were redriven or discarded).
async fn dlq_view(
    broker: &Arc<dyn Broker>,
    d: &TopicDescription,
    groups: Vec<String>,
    redrive: Option<&GroupLag>,
    limit: usize,
) -> DlqView {
    let mut view = DlqView {
        topic: d.name.clone(),
        groups,
        total: d.partitions.iter().map(|p| p.log_end - p.log_start).sum(),
        waiting: conveyor::dlq::waiting(d, redrive),
        messages: Vec::new(),
        error: None,
    };
    for p in &d.partitions {
        let floor = redrive
            .and_then(|r| {
                r.partitions
                    .iter()
                    .find(|l| l.topic == d.name && l.partition == p.partition)
            })
            .map_or(0, |l| l.committed);
        let mut at = floor.max(p.log_start);
        while view.messages.len() < limit && at < p.log_end {
            let want = limit - view.messages.len();
            let batch = match broker.fetch(&d.name, p.partition, at, want).await {
                Ok(batch) => batch,
                Err(e) => {
                    view.error = Some(e.chain().to_string());
                    return view;
                }
            };
            if batch.is_empty() {
                break;
            }
            for m in batch {
                at = m.offset + 1;
                view.messages.push(dlq_message(
                    m.partition,
                    m.offset,
                    m.timestamp,
                    m.key.as_deref(),
                    &m.value,
                    &m.headers,
                ));
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_cut_at_a_character_and_say_so() {
        assert_eq!(preview(b"short", 10), ("short".to_string(), false));
        let (text, cut) = preview("ééééé".as_bytes(), 5);
        assert_eq!((text.as_str(), cut), ("éé", true));
        let (text, cut) = preview(&[0xff, b'a'], 10);
        assert_eq!((text.as_str(), cut), ("\u{fffd}a", false));
    }

    #[test]
    fn a_dead_letter_shows_its_origin_attempts_and_error_as_text() {
        let headers = vec![
            Header::new("trace", "x"),
            Header::new(HEADER_TOPIC, "orders"),
            Header::new(HEADER_PARTITION, "3"),
            Header::new(HEADER_OFFSET, "17"),
            Header::new(HEADER_GROUP, "email"),
            Header::new(HEADER_ATTEMPTS, "5"),
            Header::new(HEADER_ERROR, "<script>alert(1)</script>"),
            Header::new(HEADER_FAILED_AT, "1700000000000"),
        ];
        let value = "v".repeat(PREVIEW_BYTES + 1);
        let m = dlq_message(0, 9, 42, Some(b"k1"), value.as_bytes(), &headers);
        assert_eq!(m.origin.as_deref(), Some("orders/3@17"));
        assert_eq!(m.group.as_deref(), Some("email"));
        assert_eq!(m.attempts, Some(5));
        assert_eq!(m.failed_at, Some(1_700_000_000_000));
        assert_eq!(m.key.as_deref(), Some("k1"));
        assert!(m.value_truncated);
        assert_eq!(m.value.len(), PREVIEW_BYTES);
        assert_eq!(m.value_bytes, PREVIEW_BYTES + 1);
        // Kept as text in the JSON: the page puts it in the DOM as text.
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["error"], "<script>alert(1)</script>");

        let plain = dlq_message(1, 0, 0, None, b"hello", &[]);
        assert_eq!(plain.origin, None);
        assert_eq!(plain.attempts, None);
        assert_eq!(plain.key, None);
    }

    #[test]
    fn dlqs_are_found_by_policy_by_name_and_by_redrive() {
        let existing: BTreeSet<String> = [
            "orders",
            "orders.email.dlq",
            "custom.dead",
            "old.gone.dlq",
            "audit",
            "redriven.from",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let groups = vec![
            ("email".to_string(), None, vec!["orders".to_string()]),
            (
                "sms".to_string(),
                Some(DlqPolicy::new(3).with_topic("custom.dead")),
                vec!["orders".to_string()],
            ),
            // Nothing dead-lettered yet: its DLQ does not exist.
            ("audit-reader".to_string(), None, vec!["audit".to_string()]),
        ];
        let redriven = BTreeSet::from(["redriven.from".to_string()]);
        let dlqs = dlq_topics(&groups, &existing, &redriven);
        assert_eq!(
            dlqs.into_iter().collect::<Vec<_>>(),
            vec![
                ("custom.dead".to_string(), vec!["sms".to_string()]),
                ("old.gone.dlq".to_string(), vec![]),
                ("orders.email.dlq".to_string(), vec!["email".to_string()]),
                ("redriven.from".to_string(), vec![]),
            ]
        );
    }
}
