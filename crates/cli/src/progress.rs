//! Progress on stderr while the CLI does long work: a spinner while an
//! image is built or added, a byte-counting bar while one is downloaded, a
//! spinner while `run` waits for a job's first output. Shown only to a
//! person at a terminal: with `--output json`, or when stderr is a pipe or
//! a file (scripts, logs, CI), nothing is drawn, so neither stdout's JSON
//! nor captured stderr ever holds a bar's escape codes.

use crate::{Global, OutputFormat};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// How often a spinner redraws itself while the work gives no news.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// Whether progress is drawn: only for text output on a terminal's stderr.
pub fn progress_is_shown(output: OutputFormat, stderr_is_terminal: bool) -> bool {
    output == OutputFormat::Text && stderr_is_terminal
}

fn draw_target(global: &Global) -> ProgressDrawTarget {
    if progress_is_shown(global.output, std::io::stderr().is_terminal()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A spinner saying `message`, ticking by itself until it is finished or
/// dropped (a hidden one draws nothing and costs nothing).
pub fn spinner(global: &Global, message: impl Into<String>) -> ProgressBar {
    let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
        .expect("the spinner template is valid");
    let bar = ProgressBar::with_draw_target(None, draw_target(global))
        .with_style(style)
        .with_message(message.into());
    if !bar.is_hidden() {
        bar.enable_steady_tick(SPINNER_TICK);
    }
    bar
}

/// A bar counting bytes towards `total_bytes` (a spinner with a byte count
/// while the total is unknown).
pub fn byte_bar(
    global: &Global,
    total_bytes: Option<u64>,
    message: impl Into<String>,
) -> ProgressBar {
    ProgressBar::with_draw_target(total_bytes, draw_target(global))
        .with_style(byte_bar_style(total_bytes))
        .with_message(message.into())
}

/// A bar towards a known total, or a running count while it is unknown
/// (set it again once the total is learnt).
pub fn byte_bar_style(total_bytes: Option<u64>) -> ProgressStyle {
    let template = match total_bytes {
        Some(_) => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        None => "{spinner} {msg} {bytes} {bytes_per_sec}",
    };
    ProgressStyle::with_template(template)
        .expect("the byte bar template is valid")
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_drawn_for_text_output_on_a_terminal_only() {
        assert!(progress_is_shown(OutputFormat::Text, true));
        assert!(!progress_is_shown(OutputFormat::Text, false));
        assert!(!progress_is_shown(OutputFormat::Json, true));
        assert!(!progress_is_shown(OutputFormat::Json, false));
    }

    #[test]
    fn bars_are_hidden_with_json_output_or_when_stderr_is_not_a_terminal() {
        let json = test_global(OutputFormat::Json);
        assert!(spinner(&json, "building").is_hidden());
        assert!(byte_bar(&json, None, "downloading").is_hidden());
        // `cargo test` captures stderr into a pipe, as scripts and CI do.
        if std::io::stderr().is_terminal() {
            eprintln!("skipped: stderr is a terminal here; the bars would be drawn");
            return;
        }
        let global = test_global(OutputFormat::Text);
        assert!(spinner(&global, "building").is_hidden());
        assert!(byte_bar(&global, Some(10), "downloading").is_hidden());
    }

    fn test_global(output: OutputFormat) -> Global {
        Global {
            broker: "http://127.0.0.1:1".into(),
            broker_args: vec![("http://127.0.0.1:1".into(), None)],
            token_on_command_line: None,
            token_file_args: Vec::new(),
            token_file: None,
            market_token_files: Vec::new(),
            token: None,
            ca_cert: None,
            server_trust: leasehold_api::ServerTrust::PublicRoots,
            output,
        }
    }
}
