//! Progress of a long command (`-p`). Piped, it prints what qemu-img prints (a
//! `    (12.34/100%)\r` line at the start and then whenever the figure moved by at least 1 %,
//! as QEMU's `qemu_progress_print` with a 1 % step, then the 100 % line and a newline), because management tools parse it (vdsm reads `(\d+\.\d+)/100%`). On a
//! terminal, when invoked as qnbd, the same figure is followed by a bar, the bytes done, the
//! rate and the time left, redrawn at most ten times a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const BAR: usize = 30;
const REDRAW: Duration = Duration::from_millis(100);

pub struct Progress {
    on: bool,
    total: u64,
    last: f64,
    /// The figure of the last plain line (negative: none yet).
    printed: f64,
    /// A bar on a terminal (else qemu-img's plain lines).
    bar: bool,
    started: Instant,
    drawn: Option<Instant>,
    width: usize,
}

impl Progress {
    /// `on`: `-p` given and not `-q`; `total`: the bytes the command goes through.
    pub fn new(on: bool, total: u64) -> Progress {
        let bar = on
            && std::io::stdout().is_terminal()
            && crate::error::program() == "qnbd"
            && std::env::var_os("QNBD_PROGRESS_PLAIN").is_none();
        Progress {
            on,
            total,
            last: -1.0,
            printed: -1.0,
            bar,
            started: Instant::now(),
            drawn: None,
            width: 0,
        }
    }

    fn percent(&self, pos: u64) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            (pos.min(self.total) as f64 * 100.0 / self.total as f64 * 100.0).floor() / 100.0
        }
    }

    /// `pos` of the total bytes are done.
    pub fn show(&mut self, pos: u64) {
        if !self.on {
            return;
        }
        let pct = self.percent(pos);
        if pct == self.last {
            return;
        }
        self.last = pct;
        if self.bar {
            let now = Instant::now();
            if self.drawn.is_some_and(|t| now - t < REDRAW) && pct < 100.0 {
                return;
            }
            self.drawn = Some(now);
            let line = bar_line(pct, pos.min(self.total), self.total, self.started.elapsed());
            self.draw(&line);
        } else if self.printed < 0.0 || pct - self.printed >= 1.0 || pct >= 100.0 {
            self.printed = pct;
            let mut o = std::io::stdout().lock();
            let _ = write!(o, "    ({pct:.2}/100%)\r");
            let _ = o.flush();
        }
    }

    fn draw(&mut self, line: &str) {
        let mut o = std::io::stdout().lock();
        // blank what a longer previous line left behind
        let pad = self.width.saturating_sub(line.len());
        let _ = write!(o, "{line}{:pad$}\r", "");
        let _ = o.flush();
        self.width = line.len();
    }

    /// The command finished.
    pub fn done(&mut self) {
        if !self.on {
            return;
        }
        if self.bar {
            let line = bar_line(100.0, self.total, self.total, self.started.elapsed());
            self.draw(&line);
            println!();
        } else {
            // qemu-img ends with the 100% line once more, then a newline
            print!("    (100.00/100%)\r\n");
            let _ = std::io::stdout().flush();
        }
    }
}

/// QEMU's own `qemu_progress_*` (util/qemu-progress.c), figure for figure, for commands whose
/// progress qemu-img reports by deltas with a step of its own (`compare`: 2 %): the figure is
/// summed in single precision, printed when it moved by more than the step (and at 0 and 100),
/// and the end is a newline, whether or not 100 was reached.
pub struct QemuProgress {
    on: bool,
    min_skip: f32,
    current: f32,
    last_print: f32,
}

impl QemuProgress {
    /// `qemu_progress_init(enabled, min_skip)`.
    pub fn new(on: bool, min_skip: f32) -> QemuProgress {
        QemuProgress {
            on,
            min_skip,
            current: 0.0,
            last_print: 0.0,
        }
    }

    /// `qemu_progress_print(delta, max)`: with `max` 0 the figure becomes `delta`, else it
    /// grows by `delta` percent of `max`.
    pub fn print(&mut self, delta: f32, max: i32) {
        let mut current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            if self.on {
                let mut o = std::io::stdout().lock();
                let _ = write!(o, "    ({:.2}/100%)\r", current as f64);
                let _ = o.flush();
            }
        }
    }

    /// `qemu_progress_end()`.
    pub fn end(&mut self) {
        if self.on {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o);
            let _ = o.flush();
        }
    }
}

/// `    (45.10/100%) [#############.................] 460.8 MiB / 1 GiB, 230.4 MiB/s, 0:02 left`
fn bar_line(pct: f64, done: u64, total: u64, elapsed: Duration) -> String {
    let filled = ((pct / 100.0) * BAR as f64).round() as usize;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let tail = if pct >= 100.0 {
        format!("done in {}", fmt_secs(secs))
    } else if rate > 0.0 {
        format!("{} left", fmt_secs((total - done) as f64 / rate))
    } else {
        String::from("--:-- left")
    };
    format!(
        "    ({pct:.2}/100%) [{}{}] {} / {}, {}/s, {tail}",
        "#".repeat(filled.min(BAR)),
        ".".repeat(BAR - filled.min(BAR)),
        crate::units::size_to_str(done),
        crate::units::size_to_str(total),
        crate::units::size_to_str(rate as u64),
    )
}

fn fmt_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_the_figures() {
        let l = bar_line(50.0, 512 << 20, 1 << 30, Duration::from_secs(2));
        assert_eq!(
            l,
            "    (50.00/100%) [###############...............] 512 MiB / 1 GiB, 256 MiB/s, 0:02 left"
        );
        let l = bar_line(100.0, 1 << 30, 1 << 30, Duration::from_secs(3725));
        assert!(l.ends_with("done in 1:02:05"), "{l}");
        assert!(l.contains(&format!("[{}]", "#".repeat(BAR))), "{l}");
    }
}
