//! The one error type of Conveyor.
//!
//! Every fallible call returns [`Error`], whose [`Error::kind`] says what class
//! of failure it was (the contract's `ErrorKind`s) and whose message names the
//! topic, partition, offset or group at fault. Backend errors are kept as the
//! [`std::error::Error::source`].

use std::fmt;

/// The class of an [`Error`]. New kinds may be added, so match with a `_` arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input: an invalid name, config value, or argument.
    InvalidArgument,
    /// The topic does not exist (and auto-create is off).
    TopicNotFound,
    /// The topic exists with a different config.
    TopicExists,
    /// The consumer group does not exist.
    GroupNotFound,
    /// The group exists with another delivery mode.
    GroupModeMismatch,
    /// The group still has live members, so it cannot be deleted: close
    /// them (or wait out their session timeout) first.
    GroupNotEmpty,
    /// The partition is outside the topic's partition range.
    PartitionOutOfRange,
    /// The record is larger than the topic's `max_message_bytes`.
    MessageTooLarge,
    /// A stale member (older generation, or no longer the owner) tried to
    /// commit, deliver, or settle.
    Fenced,
    /// The message's lease expired and was taken by another delivery.
    LeaseExpired,
    /// The operation does not apply in the group's delivery mode.
    WrongMode,
    /// Stored data is damaged before the tail of a log.
    Corrupt,
    /// Another process owns the embedded store.
    Locked,
    /// The server is unreachable, or cannot take the call now (a full
    /// Redis, a server whose durability settings changed under us); retry
    /// later.
    Unavailable,
    /// The server did not accept the credentials (wrong or missing user or
    /// password, a TLS client certificate it refuses): fix the URL or the
    /// server's users; retrying does not help.
    Unauthenticated,
    /// The server accepted who we are but refuses the operation (a
    /// PostgreSQL role without the rights the docs list, a Redis ACL):
    /// grant the rights; retrying does not help.
    PermissionDenied,
    /// The broker was opened read-only (`?read_only=true`): it describes,
    /// shows lag and fetches, and refuses every write.
    ReadOnly,
    /// The broker or consumer has been closed.
    Closed,
    /// The URL scheme names a backend that is not compiled in or not
    /// available yet, or the backend lacks the capability.
    Unsupported,
    /// An I/O error of the local file system.
    Io,
    /// A bug or an unexpected state; please report it.
    Internal,
}

impl ErrorKind {
    /// A short lower-case name for the kind, as used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::TopicNotFound => "topic not found",
            ErrorKind::TopicExists => "topic exists",
            ErrorKind::GroupNotFound => "group not found",
            ErrorKind::GroupModeMismatch => "group mode mismatch",
            ErrorKind::GroupNotEmpty => "group not empty",
            ErrorKind::PartitionOutOfRange => "partition out of range",
            ErrorKind::MessageTooLarge => "message too large",
            ErrorKind::Fenced => "fenced",
            ErrorKind::LeaseExpired => "lease expired",
            ErrorKind::WrongMode => "wrong delivery mode",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Locked => "locked",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Closed => "closed",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Io => "i/o error",
            ErrorKind::Internal => "internal error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Conveyor error: a [`kind`](Error::kind) and a message that names what
/// was wrong and where.
///
/// Match on the kind (with a `_` arm: kinds may be added) to decide what
/// to do; only [`Error::is_retriable`] errors (`Unavailable`) are worth
/// retrying as they are:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use conveyor::ErrorKind;
///
/// let broker = conveyor::open("memory://").await?;
/// let producer = broker.producer().await?;
/// match producer.send("orders", Record::new("placed")).await {
///     Ok(receipt) => println!("stored at {}", receipt.offset),
///     // Our input or our state: fix it; retrying gets the same answer.
///     Err(e) if e.kind() == ErrorKind::TopicNotFound => {
///         broker.create_topic("orders", TopicConfig::new(1)).await?;
///         producer.send("orders", Record::new("placed")).await?;
///     }
///     // A server backend is unreachable: back off and send again (with an
///     // idempotency key, the retry is stored once).
///     Err(e) if e.is_retriable() => eprintln!("later: {}", e.chain()),
///     Err(e) => return Err(e),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with Conveyor's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message naming what was wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying the same call later may succeed: true only for
    /// [`ErrorKind::Unavailable`] (a server backend could not reach its
    /// server). Every other kind fails again the same way until something
    /// changes (the input, the owner of a lock, a reopened store).
    pub fn is_retriable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable)
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::TopicNotFound`] naming the topic.
    pub fn topic_not_found(topic: &str) -> Self {
        Error::new(
            ErrorKind::TopicNotFound,
            format!("topic `{topic}` does not exist"),
        )
    }

    /// Shorthand for [`ErrorKind::LeaseExpired`]: a settle of `offset`
    /// (`what`: the group and message) under a lease no longer held.
    pub fn lease_lost(offset: u64, what: &str) -> Self {
        Error::new(
            ErrorKind::LeaseExpired,
            format!(
                "{what}: the lease on offset {offset} is no longer held (it expired and was \
                 released or re-leased, or the message was already settled)"
            ),
        )
    }

    /// Shorthand for [`ErrorKind::GroupNotFound`] naming the group.
    pub fn group_not_found(group: &str) -> Self {
        Error::new(
            ErrorKind::GroupNotFound,
            format!("group `{group}` does not exist"),
        )
    }

    /// Shorthand for [`ErrorKind::GroupNotEmpty`]: `group` cannot be
    /// deleted while these members (ids as the backend shows them in
    /// `describe_group`) are live.
    pub fn group_not_empty(group: &str, members: &[String]) -> Self {
        Error::new(
            ErrorKind::GroupNotEmpty,
            format!(
                "group `{group}` has {} live member{} ({}): close them, or wait for their \
                 session timeout, then delete the group",
                members.len(),
                if members.len() == 1 { "" } else { "s" },
                members.join(", ")
            ),
        )
    }

    /// Shorthand for [`ErrorKind::WrongMode`]: `op` of `group` is only for
    /// groups in `mode`.
    pub fn wrong_mode(group: &str, op: &str, mode: crate::DeliveryMode) -> Self {
        Error::new(
            ErrorKind::WrongMode,
            format!(
                "group `{group}`: `{op}` is only for {}-mode groups",
                mode.name()
            ),
        )
    }

    /// Shorthand for [`ErrorKind::PartitionOutOfRange`].
    pub fn partition_out_of_range(topic: &str, partition: u32, partitions: u32) -> Self {
        Error::new(
            ErrorKind::PartitionOutOfRange,
            format!("topic `{topic}`: partition {partition} out of range (topic has {partitions})"),
        )
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Internal, message)
    }

    /// An [`ErrorKind::Io`] error: `context` (what was being done, to
    /// which file) is the message, `err` the [`source`](std::error::Error::source),
    /// so a chain printer shows each once. [`Error::chain`] prints both.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, context).with_source(err)
    }

    /// The error and every source under it, `: `-separated, for a log line
    /// or a command-line tool:
    ///
    /// ```
    /// use conveyor::Error;
    /// let e = Error::io("open /q/LOCK", std::io::Error::other("permission denied"));
    /// assert_eq!(e.to_string(), "i/o error: open /q/LOCK");
    /// assert_eq!(e.chain().to_string(), "i/o error: open /q/LOCK: permission denied");
    /// ```
    pub fn chain(&self) -> impl fmt::Display + '_ {
        Chain(self)
    }
}

struct Chain<'a>(&'a Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = std::error::Error::source(self.0);
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}
