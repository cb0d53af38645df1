//! The replay progress bar: bytes of input read, on stderr, only when stderr is a terminal (a
//! log file or a CI job gets the summary alone).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Files smaller than this finish before a bar is worth drawing.
const MIN_BYTES_FOR_BAR: u64 = 8 * 1024 * 1024;

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total_bytes`, hidden when stderr is not a terminal or the input is small.
    pub fn new(total_bytes: u64) -> Self {
        let visible = std::io::stderr().is_terminal() && total_bytes >= MIN_BYTES_FOR_BAR;
        let bar = if visible {
            let bar =
                ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} replaying {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        Self { bar }
    }

    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    pub fn set_file(&self, name: &str) {
        self.bar.set_message(name.to_owned());
    }

    pub fn set_position(&self, bytes: u64) {
        self.bar.set_position(bytes);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
