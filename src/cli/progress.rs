//! The spinner `--wait` shows while it waits, on a terminal only (scripts and pipes get none).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// A spinner with `message` on stderr when `wanted` and stderr is a terminal.
    pub fn start(wanted: bool, message: &str) -> Spinner {
        if !wanted || !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message.to_string());
        // Drawn at once, so even a call that fails at once showed what it was doing.
        bar.tick();
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(bar))
    }

    pub fn set_message(&self, message: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(message.to_string());
        }
    }

    /// Clears the spinner so what follows prints on a clean line.
    pub fn finish(mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
