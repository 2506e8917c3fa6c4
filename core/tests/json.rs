//! Typed JSON payloads: a record from a value, a typed decode with a
//! clear error.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]
use conveyor_core::prelude::*;
use conveyor_core::ErrorKind;
use std::time::Duration;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Placed {
    order: u64,
    email: String,
}

#[tokio::test]
async fn json_round_trips_and_says_what_is_wrong() {
    let broker = conveyor_memory::open_default();
    broker
        .create_topic("orders", TopicConfig::new(1))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    let placed = Placed {
        order: 42,
        email: "a@example.com".into(),
    };
    let record = Record::json(&placed).unwrap();
    assert_eq!(record.headers.len(), 1);
    producer.send("orders", record).await.unwrap();
    // No content type: read as JSON.
    producer
        .send(
            "orders",
            Record::new(r#"{"order":7,"email":"b@example.com"}"#),
        )
        .await
        .unwrap();
    // JSON of another shape.
    producer
        .send(
            "orders",
            Record::json(&serde_json::json!({"order": "x"})).unwrap(),
        )
        .await
        .unwrap();
    let consumer = broker
        .consumer("billing", &["orders"], GroupConfig::queue())
        .await
        .unwrap();
    let batch = consumer.poll(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(batch[0].json::<Placed>().unwrap(), placed);
    assert_eq!(batch[1].json::<Placed>().unwrap().order, 7);
    let e = batch[2].json::<Placed>().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.message()
            .starts_with("orders/0@2: value is not a JSON `json::Placed`: invalid type"),
        "{e}"
    );
    // A map with non-string keys has no JSON form.
    let bad: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    assert_eq!(
        Record::json(&bad).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}
