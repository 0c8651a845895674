//! The server's log: one line per event on stderr, at a level (`error`, `warn`, `info`,
//! `debug`; `serve -v` is info, `-vv` debug, `--log-level` sets any), as text or as JSON lines
//! (`--log-format json`).
//!
//! Text lines are `PROGRAM: LEVEL: [conn ID PEER: ]MESSAGE`; JSON lines carry `time` (RFC 3339,
//! UTC), `level`, `program`, `event` (a stable name such as `negotiated`), `conn` and `peer`
//! when the event belongs to a connection, and `msg`. Under systemd (stderr is the journal
//! stream named by `$JOURNAL_STREAM`) text lines start with the `<N>` priority prefix that the
//! journal reads as the entry's level.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

/// How important an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// `--log-level`'s names (`warning` too).
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s {
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            _ => return None,
        })
    }

    /// The syslog priority the journal reads from a `<N>` prefix.
    fn syslog(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        }
    }
}

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

static SLOW_MS: AtomicU64 = AtomicU64::new(0);
static LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);
static JSON: AtomicBool = AtomicBool::new(false);
static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Set the level and format of the process's log (once, at startup).
pub fn configure(level: Level, format: Format) {
    LEVEL.store(level as u8, Relaxed);
    JSON.store(format == Format::Json, Relaxed);
    JOURNAL.store(stderr_is_journal(), Relaxed);
}

/// Log every request that takes at least `ms` milliseconds (0: none), once, when its reply is
/// ready (`serve --log-slow`).
pub fn set_slow_threshold(ms: u64) {
    SLOW_MS.store(ms, Relaxed);
}

/// See [`set_slow_threshold`].
#[inline]
pub fn slow_threshold() -> Option<Duration> {
    match SLOW_MS.load(Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Whether events of `level` are written.
#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Relaxed)
}

/// `$JOURNAL_STREAM` is `DEVICE:INODE` of the journal's stream when systemd connected
/// stderr to it (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(md.dev()) && ino.parse() == Ok(md.ino())
}

/// The connection an event belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conn {
    /// Numbered from 1 in accept order (0: not from a listener, e.g. `--stdio`).
    pub id: u64,
    /// `127.0.0.1:41234`, `[::1]:41234`, `unix`, `stdio`.
    pub peer: String,
}

/// Write one event: `event` is its stable name, `conn` the connection it belongs to.
pub fn event(level: Level, event: &str, conn: Option<&Conn>, msg: &str) {
    if !enabled(level) {
        return;
    }
    let program = crate::error::program();
    let line = if JSON.load(Relaxed) {
        let mut o = serde_json::Map::new();
        o.insert("time".into(), now_rfc3339().into());
        o.insert("level".into(), level.name().into());
        o.insert("program".into(), program.into());
        o.insert("event".into(), event.into());
        if let Some(c) = conn {
            o.insert("conn".into(), c.id.into());
            o.insert("peer".into(), c.peer.clone().into());
        }
        o.insert("msg".into(), msg.into());
        serde_json::Value::Object(o).to_string()
    } else {
        let prio = if JOURNAL.load(Relaxed) {
            format!("<{}>", level.syslog())
        } else {
            String::new()
        };
        match conn {
            Some(c) => format!(
                "{prio}{program}: {}: conn {} {}: {msg}",
                level.name(),
                c.id,
                c.peer
            ),
            None => format!("{prio}{program}: {}: {msg}", level.name()),
        }
    };
    eprintln!("{line}");
}

/// UTC now as `2026-12-07T20:45:00.123Z`.
fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
        assert_eq!(civil_from_days(20429), (2025, 12, 7));
    }

    #[test]
    fn levels_order_and_parse() {
        assert!(Level::Error < Level::Debug);
        assert_eq!(Level::parse("warning"), Some(Level::Warn));
        assert_eq!(Level::parse("loud"), None);
    }
}
