//! §1, topics and partitions: names, partition counts, creation, growth,
//! `TopicNotFound`, listing and deletion.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{expect_kind, unique, Backend, Ctx};
use conveyor_core::prelude::*;
use conveyor_core::{
    BrokerOptions, ErrorKind, GroupConfig, Record, Result, Retention, TopicConfig,
};
use std::time::Duration;

/// §1: "A topic has ... a fixed number of partitions chosen at creation";
/// "`describe_topic` reports both [log start and log end] per partition": a new
/// topic has its partitions, each empty at 0..0, with its config.
pub async fn create_and_describe(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(3)
        .with_max_message_bytes(4096)
        .with_dedup_window(Duration::from_secs(7));
    let topic = ctx.topic_with("describe", config).await?;
    let d = ctx.broker.describe_topic(&topic).await?;
    assert_eq!(d.name, topic);
    assert_eq!(d.config, config);
    assert_eq!(d.partitions.len(), 3);
    for (i, p) in d.partitions.iter().enumerate() {
        assert_eq!(p.partition, i as u32);
        assert_eq!((p.log_start, p.log_end), (0, 0), "partition {i}");
    }
    Ok(())
}

/// §1: "Creating a topic that exists with the same config is a no-op": records
/// already there stay.
pub async fn create_same_config_is_noop(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(2).with_retention(Retention::forever());
    let topic = ctx.topic_with("noop", config).await?;
    ctx.producer()
        .await?
        .send(&topic, Record::new("x").with_partition(1))
        .await?;
    ctx.broker.create_topic(&topic, config).await?;
    assert_eq!(ctx.log_ends(&topic).await?, vec![0, 1]);
    Ok(())
}

/// §1: "with a different config it is `ErrorKind::TopicExists`" (partitions,
/// retention, size limit or dedup window), and the topic is unchanged.
pub async fn create_other_config_is_topic_exists(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(2);
    let topic = ctx.topic_with("exists", config).await?;
    let others = [
        TopicConfig::new(3),
        TopicConfig::new(2).with_max_message_bytes(10),
        TopicConfig::new(2).with_retention(Retention::forever().with_max_bytes(1000)),
        TopicConfig::new(2).with_dedup_window(Duration::from_secs(1)),
    ];
    for other in others {
        let e = expect_kind(
            ctx.broker.create_topic(&topic, other).await,
            ErrorKind::TopicExists,
        );
        assert!(e.message().contains(&topic), "message names the topic: {e}");
    }
    assert_eq!(ctx.broker.describe_topic(&topic).await?.config, config);
    Ok(())
}

/// §1: "A topic has a name of 1 to 249 characters from `[A-Za-z0-9._-]`":
/// empty, 250 characters and other characters are `InvalidArgument` and create
/// nothing; 249 characters and every allowed character are fine.
pub async fn invalid_topic_names(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let before = ctx.broker.list_topics().await?;
    let long = "a".repeat(250);
    for bad in [
        "",
        long.as_str(),
        "a b",
        "a/b",
        "ü-topic",
        "a\0b",
        "tab\t",
        "a:b",
        "*",
    ] {
        expect_kind(
            ctx.broker.create_topic(bad, TopicConfig::new(1)).await,
            ErrorKind::InvalidArgument,
        );
    }
    assert_eq!(ctx.broker.list_topics().await?, before, "nothing created");
    let mut ok249 = unique("n");
    while ok249.len() < 249 {
        ok249.push('x');
    }
    ctx.broker.create_topic(&ok249, TopicConfig::new(1)).await?;
    let charset = unique("AZaz09._-");
    ctx.broker
        .create_topic(&charset, TopicConfig::new(1))
        .await?;
    let topics = ctx.broker.list_topics().await?;
    assert!(topics.contains(&ok249) && topics.contains(&charset));
    Ok(())
}

/// §1: "a fixed number of partitions (1 to 10,000)": 0 and 10,001 are
/// `InvalidArgument` and create nothing.
pub async fn partition_count_bounds(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    for n in [0, 10_001, u32::MAX] {
        let name = unique("parts");
        expect_kind(
            ctx.broker.create_topic(&name, TopicConfig::new(n)).await,
            ErrorKind::InvalidArgument,
        );
        expect_kind(
            ctx.broker.describe_topic(&name).await,
            ErrorKind::TopicNotFound,
        );
    }
    let one = ctx.topic("one", 1).await?;
    assert_eq!(ctx.log_ends(&one).await?.len(), 1);
    Ok(())
}

/// §1: "Partitions may be added later, never removed": growing adds empty
/// usable partitions and keeps the old ones; the same count is a no-op;
/// shrinking or going past 10,000 is `InvalidArgument` and changes nothing.
pub async fn add_partitions_grows_never_shrinks(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("grow", 2).await?;
    let producer = ctx.producer().await?;
    producer
        .send(&topic, Record::new("a").with_partition(1))
        .await?;
    ctx.broker.add_partitions(&topic, 4).await?;
    assert_eq!(ctx.log_ends(&topic).await?, vec![0, 1, 0, 0]);
    assert_eq!(
        ctx.broker.describe_topic(&topic).await?.config.partitions,
        4
    );
    let r = producer
        .send(&topic, Record::new("b").with_partition(3))
        .await?;
    assert_eq!((r.partition, r.offset), (3, 0));
    ctx.broker.add_partitions(&topic, 4).await?;
    expect_kind(
        ctx.broker.add_partitions(&topic, 2).await,
        ErrorKind::InvalidArgument,
    );
    expect_kind(
        ctx.broker.add_partitions(&topic, 10_001).await,
        ErrorKind::InvalidArgument,
    );
    assert_eq!(ctx.log_ends(&topic).await?, vec![0, 1, 0, 1]);
    Ok(())
}

/// §1: "Any operation on a missing topic is `ErrorKind::TopicNotFound` (no
/// auto-creation unless the broker was opened with auto-create on)".
pub async fn unknown_topic_is_topic_not_found(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let t = unique("missing");
    let b = &ctx.broker;
    let p = ctx.producer().await?;
    expect_kind(b.describe_topic(&t).await, ErrorKind::TopicNotFound);
    expect_kind(b.add_partitions(&t, 3).await, ErrorKind::TopicNotFound);
    expect_kind(b.delete_topic(&t).await, ErrorKind::TopicNotFound);
    expect_kind(b.fetch(&t, 0, 0, 10).await, ErrorKind::TopicNotFound);
    expect_kind(
        b.offset_for_timestamp(&t, 0, 0).await,
        ErrorKind::TopicNotFound,
    );
    let e = expect_kind(p.send(&t, Record::new("x")).await, ErrorKind::TopicNotFound);
    assert!(e.message().contains(&t), "message names the topic: {e}");
    expect_kind(
        p.send_batch(&t, vec![Record::new("x")]).await,
        ErrorKind::TopicNotFound,
    );
    expect_kind(
        b.consumer(&unique("g"), &[&t], GroupConfig::stream()).await,
        ErrorKind::TopicNotFound,
    );
    expect_kind(
        b.consumer(&unique("g"), &[&t], GroupConfig::queue()).await,
        ErrorKind::TopicNotFound,
    );
    assert!(!b.list_topics().await?.contains(&t), "not auto-created");
    Ok(())
}

/// §1: `list_topics` gives "names of all topics, sorted": created topics are
/// listed, in order.
pub async fn list_topics_sorted(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let base = unique("list");
    let names = [
        format!("{base}-c"),
        format!("{base}-a"),
        format!("{base}-b"),
    ];
    for n in &names {
        ctx.broker.create_topic(n, TopicConfig::new(1)).await?;
    }
    let listed = ctx.broker.list_topics().await?;
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "list_topics is sorted");
    let mine: Vec<&String> = listed.iter().filter(|t| t.starts_with(&base)).collect();
    assert_eq!(
        mine,
        vec![
            &format!("{base}-a"),
            &format!("{base}-b"),
            &format!("{base}-c")
        ]
    );
    Ok(())
}

/// §1: `delete_topic` removes a topic and its records: afterwards it is
/// `TopicNotFound` and no longer listed.
pub async fn delete_topic(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("delete", 2).await?;
    ctx.producer().await?.send(&topic, Record::new("x")).await?;
    ctx.broker.delete_topic(&topic).await?;
    expect_kind(
        ctx.broker.describe_topic(&topic).await,
        ErrorKind::TopicNotFound,
    );
    expect_kind(
        ctx.producer().await?.send(&topic, Record::new("x")).await,
        ErrorKind::TopicNotFound,
    );
    assert!(!ctx.broker.list_topics().await?.contains(&topic));
    Ok(())
}

/// §1: "no auto-creation unless the broker was opened with auto-create on":
/// with it on, sending to or subscribing to a missing topic creates it.
pub async fn auto_create_when_enabled(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    ctx.broker.close().await?;
    let ctx = Ctx::open_with(
        backend,
        BrokerOptions::default().with_auto_create_topics(true),
    )
    .await?;
    let sent = unique("auto-send");
    let r = ctx.producer().await?.send(&sent, Record::new("x")).await?;
    assert_eq!(r.offset, 0);
    assert_eq!(ctx.read_all(&sent, r.partition).await?.len(), 1);
    let joined = unique("auto-join");
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&joined], GroupConfig::stream())
        .await?;
    c.close().await?;
    let topics = ctx.broker.list_topics().await?;
    assert!(topics.contains(&sent) && topics.contains(&joined));
    Ok(())
}
