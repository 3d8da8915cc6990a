//! The `polypwatch` binary: parses the command line, runs the subcommand (`cli/`, one module
//! each), prints a fatal error as one line.

mod cli;

use anyhow::Result;
use clap::Parser;

use cli::Command;

/// polypwatch: real-time polyp detection on a colonoscopy video feed.
///
/// With no command, replays the bundled demo clip through the shipped model and prints alert
/// events as they happen, until stopped (Ctrl-C).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

fn main() -> std::process::ExitCode {
    polypwatch::model::keep_frame_buffers();
    match dispatch() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // JOURNAL_STREAM alone is inherited by every child of a service (and by whole
            // desktop sessions); stderr is the journal only if its device:inode match.
            let journal = systemd_journal_logger::connected_to_journal();
            // `{:#}` prints each cause once: our errors carry their cause either in their
            // message or as `source()`, never both (docs/architecture.md, "Errors").
            eprintln!("{}", fatal_line(&format!("{e:#}"), journal));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The line a fatal error ends the process with. Under systemd stderr goes to the journal as
/// info unless the line starts with a syslog level prefix: the one line saying why the
/// service cannot start (a missing required GPIO line, an unreadable config) was filed as
/// info, invisible to `journalctl -p err`. `<3>` (err) is read and stripped by journald.
fn fatal_line(msg: &str, journal: bool) -> String {
    if journal {
        format!("<3>polypwatch: {msg}")
    } else {
        format!("polypwatch: {msg}")
    }
}

fn dispatch() -> Result<()> {
    match Cli::parse().command {
        None => cli::run::run(cli::run::Args::default()),
        Some(c) => c.run(),
    }
}

#[cfg(test)]
mod fatal_tests {
    use super::fatal_line;

    #[test]
    fn a_fatal_error_is_an_err_line_in_the_journal_and_plain_on_a_terminal() {
        assert_eq!(fatal_line("no line", true), "<3>polypwatch: no line");
        assert_eq!(fatal_line("no line", false), "polypwatch: no line");
    }
}
