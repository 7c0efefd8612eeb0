//! Live terminal output for `demo` and `drill`: a frame redrawn in place on a terminal, or
//! printed every few seconds when the output is a pipe or a CI log.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

/// How often a frame is printed when the output is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct LiveView {
    tty: bool,
    lines_drawn: usize,
    last_plain: Option<Instant>,
    enabled: bool,
}

impl LiveView {
    /// `enabled = false` prints nothing (e.g. with `--json`).
    pub fn new(enabled: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            lines_drawn: 0,
            last_plain: None,
            enabled,
        }
    }

    /// Draws `lines`, replacing the previous frame on a terminal.
    pub fn draw(&mut self, lines: &[String]) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.lines_drawn > 0 {
                let _ = write!(err, "\x1b[{}A", self.lines_drawn);
            }
            for line in lines {
                let _ = writeln!(err, "\x1b[2K{line}");
            }
            self.lines_drawn = lines.len();
        } else if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            for line in lines {
                let _ = writeln!(err, "{line}");
            }
            self.last_plain = Some(Instant::now());
        }
        let _ = err.flush();
    }

    /// Ends the live frame: the next output starts below it.
    pub fn finish(&mut self, lines: &[String]) {
        if !self.enabled {
            return;
        }
        self.last_plain = None;
        self.draw(lines);
        self.lines_drawn = 0;
    }

    pub fn say(&mut self, line: &str) {
        if self.enabled {
            eprintln!("{line}");
            self.lines_drawn = 0;
        }
    }
}

/// `[#########.........]  9/20`
pub fn progress_bar(label: &str, done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!(
        "{label:<18} [{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    )
}

/// Seconds as `4.2s`, `3m05s`, `2h01m`.
pub fn short_duration(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else if seconds < 3600.0 {
        format!(
            "{}m{:02}s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{}h{:02}m",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(
            progress_bar("x", 5, 10, 10),
            format!("{:<18} [#####.....] 5/10", "x")
        );
        assert_eq!(
            progress_bar("x", 0, 0, 4),
            format!("{:<18} [####] 0/0", "x")
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(short_duration(4.24), "4.2s");
        assert_eq!(short_duration(185.0), "3m05s");
        assert_eq!(short_duration(7260.0), "2h01m");
    }
}
