//! How messages and tables are printed: text, JSON lines, tables.

use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use conveyor::Message;
use serde_json::{json, Value};

/// Output format of messages.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The value as text, one message a line.
    Text,
    /// One JSON object a line: topic, partition, offset, timestamp, key,
    /// value, headers, attempt.
    Json,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A message as a JSON object.
pub fn message_json(m: &Message) -> Value {
    json!({
        "topic": m.topic,
        "partition": m.partition,
        "offset": m.offset,
        "timestamp": m.timestamp,
        "key": m.key.as_ref().map(|k| text(k)),
        "value": text(&m.value),
        "headers": m.headers.iter().map(|h| json!([h.name, text(&h.value)])).collect::<Vec<_>>(),
        "attempt": m.attempt,
    })
}

/// Print a message in the chosen format.
pub fn print_message(m: &Message, format: Format, verbose: bool) {
    match format {
        Format::Json => println!("{}", message_json(m)),
        Format::Text if verbose => println!(
            "{} key={} {}",
            m.position(),
            m.key.as_ref().map_or("-".into(), |k| text(k)),
            text(&m.value)
        ),
        Format::Text => println!("{}", text(&m.value)),
    }
}

/// A table with our look.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}
