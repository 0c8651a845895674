//! Replays the `write_ops` fuzz corpus (and any kept crash reproducers) through the fuzz
//! target's entry point, `qnbd::testing::write_ops`, on stable Rust.
//!
//! Each input builds an image, runs its operations with one injected storage fault and checks
//! the image left behind (it opens, the check finds no corruption, every byte reads a value the
//! operations allow); a violation panics. Each input runs on its own thread so that a panic
//! names the file that caused it and the other inputs still run; two threads at a time.

use qcow2_spec_tests::corpus_inputs;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[test]
fn write_fuzz_corpus_replays_without_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let dir = fuzz.join("corpus/write_ops");
    let corpus = corpus_inputs(&dir);
    assert!(!corpus.is_empty(), "no seeds in {}", dir.display());
    let all: Vec<PathBuf> = corpus
        .into_iter()
        .chain(corpus_inputs(&fuzz.join("artifacts/write_ops")))
        .collect();

    let started = std::time::Instant::now();
    let next = Mutex::new(0usize);
    let panicked = Mutex::new(Vec::new());
    let counts = Mutex::new((0u64, 0u64, 0u64)); // refused, fault reached, failed operations
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let path = {
                    let mut n = next.lock().unwrap();
                    let Some(p) = all.get(*n) else { break };
                    *n += 1;
                    p.clone()
                };
                let data = fs::read(&path).unwrap();
                let outcome = std::thread::Builder::new()
                    .name(path.file_name().unwrap().to_string_lossy().into_owned())
                    .spawn(move || qnbd::testing::write_ops(&data))
                    .unwrap()
                    .join();
                match outcome {
                    Ok(Ok(r)) => {
                        let mut c = counts.lock().unwrap();
                        c.1 += u64::from(r.fault_hit);
                        c.2 += r.failed as u64;
                    }
                    Ok(Err(_)) => counts.lock().unwrap().0 += 1,
                    Err(_) => panicked.lock().unwrap().push(path.display().to_string()),
                }
            });
        }
    });
    let panicked = panicked.into_inner().unwrap();
    let (refused, hit, failed) = counts.into_inner().unwrap();
    eprintln!(
        "{} inputs in {:.1} s: {refused} refused, {hit} reached their fault ({failed} failed \
         operations), {} panicked",
        all.len(),
        started.elapsed().as_secs_f64(),
        panicked.len()
    );
    assert!(
        panicked.is_empty(),
        "panicked on:\n  {}",
        panicked.join("\n  ")
    );
}
