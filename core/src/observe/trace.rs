//! Spans for send, receive and process, and W3C trace context carried in
//! a record's headers. This module owns the span names and fields and
//! the `traceparent`/`tracestate` headers; it records no metrics.
//!
//! Spans are plain [`tracing`] spans, named and given fields after
//! OpenTelemetry's messaging conventions (`otel.name` "send orders",
//! `otel.kind`, `messaging.*`), so `tracing-opentelemetry` exports them
//! as they are. With the `opentelemetry` feature, a send also writes the
//! send span's context into each record's `traceparent` (and
//! `tracestate`) header, unless the record already carries one (a
//! redriven message keeps its first producer's), and a process span
//! takes the message's context as its parent; a receive span links to
//! every message it returned (a batch has many parents). Without the
//! feature, nothing is written to headers.

use super::Labels;
use crate::record::{Header, Message};
use tracing::Span;

/// The W3C trace context header with the producer's trace and span ids.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// The span of a `send_batch` of `count` records to `topic`.
pub(crate) fn send_span(system: &'static str, topic: &str, count: usize) -> Span {
    tracing::info_span!(
        "send",
        otel.name = %format_args!("send {topic}"),
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.name = "send",
        "messaging.operation.type" = "send",
        messaging.destination.name = topic,
        messaging.batch.message_count = count,
        "error.type" = tracing::field::Empty,
    )
}

/// The span of a `poll` by a member of `labels.group`.
pub(crate) fn receive_span(labels: &Labels) -> Span {
    tracing::debug_span!(
        "receive",
        otel.name = "receive",
        otel.kind = "client",
        messaging.system = labels.system,
        messaging.operation.name = "receive",
        "messaging.operation.type" = "receive",
        messaging.consumer.group.name = labels.group.as_deref(),
        messaging.batch.message_count = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    )
}

/// The span of processing one message: a child of the span that sent it
/// (with the `opentelemetry` feature, from its `traceparent` header).
/// [`Runner`](crate::runner::Runner) opens one around each handler call;
/// code that polls and handles messages itself can do the same:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use std::time::Duration;
/// use tracing::Instrument;
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("orders", TopicConfig::new(1)).await?;
/// broker.producer().await?.send("orders", Record::new("o-1")).await?;
/// let consumer = broker.consumer("billing", &["orders"], GroupConfig::queue()).await?;
/// for message in consumer.poll(10, Duration::from_secs(1)).await? {
///     let span = conveyor::observe::process_span(&message, consumer.labels().as_ref());
///     async { /* handle it */ }.instrument(span).await;
///     consumer.ack(&message).await?;
/// }
/// # Ok(())
/// # }
/// ```
pub fn process_span(message: &Message, labels: Option<&Labels>) -> Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {}", message.topic),
        otel.kind = "consumer",
        messaging.system = labels.map_or("unknown", |l| l.system),
        messaging.operation.name = "process",
        "messaging.operation.type" = "process",
        messaging.destination.name = message.topic.as_str(),
        messaging.destination.partition.id = message.partition,
        messaging.consumer.group.name = labels.and_then(|l| l.group.as_deref()),
        messaging.message.id = %format_args!("{}-{}", message.partition, message.offset),
        messaging.message.delivery_count = message.attempt,
        "error.type" = tracing::field::Empty,
    );
    otel::adopt_parent(&span, &message.headers);
    span
}

/// Mark `span` failed with `kind`.
pub(crate) fn failed(span: &Span, kind: &str) {
    span.record("error.type", kind);
    otel::set_error(span, kind);
}

/// Write the current context of `span` into `headers` (with the
/// `opentelemetry` feature, and unless they carry one already).
pub(crate) fn inject(span: &Span, headers: &mut Vec<Header>) {
    otel::inject(span, headers);
}

/// Link the receive `span` to the context of each message.
pub(crate) fn link(span: &Span, messages: &[Message]) {
    span.record("messaging.batch.message_count", messages.len());
    otel::link(span, messages);
}

/// A `traceparent` header value: version 00, the trace id, the parent
/// span id, the flags (`01` sampled).
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
pub(crate) fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> String {
    format!("00-{trace_id:032x}-{span_id:016x}-{flags:02x}")
}

/// The trace id, span id and flags of a `traceparent` header value, or
/// `None` if it is not valid W3C trace context (all-zero ids, a bad
/// length, version `ff`). A later version is read by its first four
/// fields, as the recommendation asks.
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
pub(crate) fn parse_traceparent(value: &str) -> Option<(u128, u64, u8)> {
    let value = value.trim();
    let mut fields = value.split('-');
    let version = fields.next()?;
    let trace = fields.next()?;
    let span = fields.next()?;
    let flags = fields.next()?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version.eq_ignore_ascii_case("ff") {
        return None;
    }
    if version == "00" && (fields.next().is_some() || value.len() != 55) {
        return None;
    }
    // Upper-case hex is not valid trace context.
    let lower = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) || !lower(trace) || !lower(span) {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let span = u64::from_str_radix(span, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace != 0 && span != 0).then_some((trace, span, flags))
}

/// The value of the header `name`, if it is there and UTF-8.
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

#[cfg(feature = "opentelemetry")]
mod otel {
    //! The OpenTelemetry side: contexts of `tracing` spans (through
    //! `tracing-opentelemetry`) to and from the W3C headers.
    use super::{format_traceparent, header, parse_traceparent, TRACEPARENT, TRACESTATE};
    use crate::record::{Header, Message};
    use opentelemetry::trace::{
        SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use std::str::FromStr;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The remote span context a message's headers carry.
    pub(super) fn extract(headers: &[Header]) -> Option<SpanContext> {
        let (trace, span, flags) = parse_traceparent(header(headers, TRACEPARENT)?)?;
        let state = header(headers, TRACESTATE)
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        Some(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::new(flags),
            true,
            state,
        ))
    }

    pub(super) fn inject(span: &Span, headers: &mut Vec<Header>) {
        if header(headers, TRACEPARENT).is_some() {
            return;
        }
        let context = span.context();
        let span_ref = context.span();
        let sc = span_ref.span_context();
        if !sc.is_valid() {
            return;
        }
        let trace = u128::from_be_bytes(sc.trace_id().to_bytes());
        let id = u64::from_be_bytes(sc.span_id().to_bytes());
        let value = format_traceparent(trace, id, sc.trace_flags().to_u8());
        headers.push(Header::new(TRACEPARENT, value));
        let state = sc.trace_state().header();
        if !state.is_empty() {
            headers.push(Header::new(TRACESTATE, state));
        }
    }

    pub(super) fn adopt_parent(span: &Span, headers: &[Header]) {
        if let Some(parent) = extract(headers) {
            // Fails only when the span is disabled: nothing to parent.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent));
        }
    }

    pub(super) fn link(span: &Span, messages: &[Message]) {
        for message in messages {
            if let Some(context) = extract(&message.headers) {
                span.add_link(context);
            }
        }
    }

    pub(super) fn set_error(span: &Span, kind: &str) {
        span.set_status(Status::error(kind.to_owned()));
    }
}

#[cfg(not(feature = "opentelemetry"))]
mod otel {
    //! Without the `opentelemetry` feature: spans carry their fields, and
    //! nothing goes to or comes from headers.
    use crate::record::{Header, Message};
    use tracing::Span;

    pub(super) fn inject(_: &Span, _: &mut Vec<Header>) {}
    pub(super) fn adopt_parent(_: &Span, _: &[Header]) {}
    pub(super) fn link(_: &Span, _: &[Message]) {}
    pub(super) fn set_error(_: &Span, _: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_written_and_read_back() {
        let value = format_traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1);
        assert_eq!(
            value,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            parse_traceparent(&value),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may add fields after the four it shares.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
                .is_some()
        );
    }
}
