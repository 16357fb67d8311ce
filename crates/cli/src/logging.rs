//! What an operator sets on a service (`broker`, `agent`, `up`): the log
//! format and who may read `/metrics`; and the tracing subscriber every
//! command logs through (to stderr: a service's stdout carries only its
//! ready line).

use clap::{Args, ValueEnum};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line for log collectors: `timestamp`, `level`,
    /// `target`, the event's fields (`message`, `lease_id`, `job_id`, ...)
    /// at the top, and the fields of the spans it happened in (`span`,
    /// `spans`).
    Json,
}

#[derive(Args, Clone, Debug, Default)]
pub struct OperatorArgs {
    /// How log lines (on stderr) are written; LEASEHOLD_LOG filters them
    /// (e.g. `info`, `warn,leasehold_agent=debug`).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Serve /metrics to anyone who can connect, without a token (a
    /// Prometheus scraping a private address). Without it only the admin
    /// (broker) or the host's lender (agent) may read it. It names no
    /// principal, token or key either way.
    #[arg(long)]
    pub metrics_public: bool,
}

/// What is logged unless LEASEHOLD_LOG says otherwise: warnings, plus the
/// agent's and the image cache's progress notes (image downloads), which
/// an operator wants to see.
fn filter_from_environment() -> EnvFilter {
    EnvFilter::try_from_env("LEASEHOLD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,leasehold_agent=info,leasehold_images=info"))
}

/// A subscriber writing `format` lines to `writer`, keeping what `filter`
/// lets through.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// Installs the process's subscriber: `format` lines on stderr.
pub fn init(format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let installed = tracing::subscriber::set_global_default(subscriber(
        format,
        filter_from_environment(),
        std::io::stderr,
        ansi,
    ));
    if let Err(error) = installed {
        eprintln!("leasehold: cannot set up logging: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log lines kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn captured_lines(format: LogFormat, log: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(
            format,
            EnvFilter::new("info"),
            move || writer.clone(),
            false,
        );
        tracing::subscriber::with_default(subscriber, log);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn json_lines_parse_and_carry_the_event_and_span_ids() {
        let lines = captured_lines(LogFormat::Json, || {
            let span = tracing::info_span!("job", lease_id = 7u64, job_id = 42u64);
            let _entered = span.enter();
            tracing::warn!(partition = 2u32, "a job's line");
            tracing::info!(lease_id = 9u64, "a lease's line");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["message"], "a job's line");
        assert_eq!(first["partition"], 2);
        assert_eq!(first["span"]["lease_id"], 7);
        assert_eq!(first["span"]["job_id"], 42);
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["lease_id"], 9);
    }

    #[test]
    fn text_lines_are_not_json_and_still_name_the_ids() {
        let lines = captured_lines(LogFormat::Text, || {
            tracing::info!(lease_id = 9u64, "a lease's line");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_err());
        assert!(lines[0].contains("lease_id=9"), "{}", lines[0]);
    }
}
