//! `serve --metrics ADDR`: the exports' statistics in Prometheus' text exposition format,
//! over a minimal HTTP/1.0 responder on its own thread. Every `GET` (any path) is answered
//! with the current figures; anything else gets `405`. A request must arrive within 5 s and
//! fit in 8 KiB; one scrape at a time.

use super::export::ExportSet;
use super::server::Listener;
use super::stats::prometheus_header;
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// The scrape body: every export that keeps statistics.
pub fn render(exports: &ExportSet) -> String {
    let mut body = String::from(prometheus_header());
    for e in exports.iter() {
        if let Some(s) = &e.stats {
            s.prometheus(&e.name, &mut body);
        }
    }
    body
}

/// Answer scrapes on `listener` for as long as the process runs.
pub fn start(listener: Listener, exports: Arc<ExportSet>) -> Result<()> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            let Ok(mut conn) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let _ = conn.set_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            let complete = loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => {
                        req.extend_from_slice(&buf[..n]);
                        if req.windows(4).any(|w| w == b"\r\n\r\n")
                            || req.windows(2).any(|w| w == b"\n\n")
                        {
                            break true;
                        }
                        if req.len() > 8192 {
                            break false;
                        }
                    }
                }
            };
            let (status, body) = if !complete {
                ("400 Bad Request", String::from("bad request\n"))
            } else if req.starts_with(b"GET ") {
                ("200 OK", render(&exports))
            } else {
                ("405 Method Not Allowed", String::from("only GET\n"))
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(body.as_bytes());
            conn.shutdown();
        })
        .map(|_| ())
        .map_err(|e| Error::io("starting the metrics thread", e))
}
