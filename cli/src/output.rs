//! How results reach the user: lines on stdout that end the command
//! quietly when the reader went away (`conveyor consume ... | head -1`),
//! tables or JSON, counts with correct plurals and thousands separators,
//! rates and durations in human units.

use crate::exit::Exit;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use std::fmt::Display;
use std::io::Write;
use std::time::Duration;

/// Output format of every command that prints data.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Text for people: tables, one message value a line.
    Text,
    /// JSON for programs: one JSON object a line (messages), or one JSON
    /// document (everything else).
    Json,
}

/// Why a command ended without success.
#[derive(Debug)]
pub enum CliError {
    /// An error line for stderr, and the exit status that says what kind
    /// of failure it was.
    Failed {
        /// What went wrong, where.
        message: String,
        /// The exit status.
        exit: Exit,
    },
    /// Whoever read stdout closed it (`| head -1`): end quietly.
    BrokenPipe,
}

impl CliError {
    /// A failure of this kind.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError::Failed {
            message: message.into(),
            exit,
        }
    }

    /// A wrong command line (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError::new(Exit::Usage, message)
    }

    /// The same failure with `prefix` before its message.
    pub fn context(self, prefix: &str) -> Self {
        self.map_message(|m| format!("{prefix}{m}"))
    }

    /// The same failure (and exit status) with its message rewritten.
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            CliError::Failed { message, exit } => CliError::Failed {
                message: f(message),
                exit,
            },
            pipe => pipe,
        }
    }
}

impl From<conveyor::Error> for CliError {
    fn from(e: conveyor::Error) -> Self {
        CliError::new(Exit::of(e.kind()), e.chain().to_string())
    }
}

/// A message without a kind: a plain failure (exit 1).
impl From<String> for CliError {
    fn from(s: String) -> Self {
        CliError::new(Exit::Failure, s)
    }
}

impl From<&str> for CliError {
    fn from(s: &str) -> Self {
        CliError::new(Exit::Failure, s)
    }
}

/// What a command returns.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Print one line on stdout. A closed pipe is [`CliError::BrokenPipe`]
/// (the command stops and exits quietly), never a panic.
pub fn out(line: impl Display) -> CliResult {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => CliError::BrokenPipe,
        _ => CliError::new(Exit::Io, format!("writing to stdout: {e}")),
    })
}

/// Print a JSON document on one line.
pub fn out_json(value: &serde_json::Value) -> CliResult {
    out(value)
}

/// A table with our look.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// A progress line on stderr for long work (`what`: "produced",
/// "consumed"): a count and a human rate, drawn only when stderr is a
/// terminal and stdout is not (so it never mixes with the data), and
/// with a `len`, a bar.
pub fn progress(what: &str, len: Option<u64>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || (len.is_none() && std::io::stdout().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let template = match len {
        Some(_) => "{msg:>9} [{bar:40}] {human_pos}/{human_len} {rate} eta {eta}",
        None => "{spinner} {msg} {human_pos} {rate}",
    };
    let style = indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&rate(state.pos(), state.elapsed()));
            },
        )
        .progress_chars("=> ");
    let pb = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// `14863` as `14,863`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 record`, `14,863 records`.
pub fn count(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        _ => format!("{} {noun}s", thousands(n)),
    }
}

/// `n` things over `elapsed` as `14,863/s`.
pub fn rate(n: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return "-".to_string();
    }
    format!("{}/s", thousands((n as f64 / secs).round() as u64))
}

/// A duration for people: `2 min`, `1.5 s`, `250 ms`, `87 µs`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 86_400 && secs.is_multiple_of(86_400) {
        return count(secs / 86_400, "day");
    }
    if secs >= 3_600 && secs.is_multiple_of(3_600) {
        return format!("{} h", secs / 3_600);
    }
    if secs >= 60 && secs.is_multiple_of(60) {
        return format!("{} min", secs / 60);
    }
    if secs >= 1 {
        let n = format!("{:.3}", d.as_secs_f64());
        return format!("{} s", n.trim_end_matches('0').trim_end_matches('.'));
    }
    let micros = d.as_micros();
    if micros >= 1000 {
        return format!("{:.1} ms", micros as f64 / 1000.0).replace(".0 ms", " ms");
    }
    format!("{micros} µs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(14_863), "14,863");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(count(1, "record"), "1 record");
        assert_eq!(count(0, "record"), "0 records");
        assert_eq!(count(2_500, "message"), "2,500 messages");
        assert_eq!(rate(14_863, Duration::from_secs(1)), "14,863/s");
        assert_eq!(rate(10, Duration::from_millis(3)), "3,333/s");
        assert_eq!(human_duration(Duration::from_secs(120)), "2 min");
        assert_eq!(human_duration(Duration::from_secs(7200)), "2 h");
        assert_eq!(human_duration(Duration::from_secs(86_400)), "1 day");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(human_duration(Duration::from_micros(87)), "87 µs");
    }
}
