//! Replays the `open_map` fuzz corpus (and any kept crash reproducers) through the fuzz
//! target's entry point, `qnbd::testing::open_and_map`, on stable Rust.
//!
//! Every input may fail to open or read; none may panic. Each input runs on its own thread so
//! that a panic names the file that caused it and the other inputs still run.

use qcow2_spec_tests::corpus_inputs;
use std::fs;
use std::path::{Path, PathBuf};

#[test]
fn fuzz_corpus_replays_without_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = corpus_inputs(&fuzz.join("corpus/open_map"));
    assert!(
        !corpus.is_empty(),
        "no seeds in {}",
        fuzz.join("corpus/open_map").display()
    );
    let all: Vec<PathBuf> = corpus
        .into_iter()
        .chain(corpus_inputs(&fuzz.join("artifacts/open_map")))
        .collect();

    let mut panicked = Vec::new();
    let (mut opened, mut refused) = (0, 0);
    for path in &all {
        let data = fs::read(path).unwrap();
        let outcome = std::thread::Builder::new()
            .name(path.file_name().unwrap().to_string_lossy().into_owned())
            .spawn(move || qnbd::testing::open_and_map(&data).is_ok())
            .unwrap()
            .join();
        match outcome {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(_) => panicked.push(path.display().to_string()),
        }
    }
    eprintln!(
        "{} inputs: {opened} opened and mapped, {refused} refused, {} panicked",
        all.len(),
        panicked.len()
    );
    assert!(
        panicked.is_empty(),
        "panicked on:\n  {}",
        panicked.join("\n  ")
    );
}

/// Replays the `nbd_session` corpus: every transcript ends the connection cleanly, and the
/// seed transcripts get real answers.
#[test]
fn nbd_session_corpus_replays_without_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = corpus_inputs(&fuzz.join("corpus/nbd_session"));
    assert!(!corpus.is_empty(), "empty nbd_session corpus");
    for p in corpus
        .iter()
        .chain(corpus_inputs(&fuzz.join("artifacts/nbd_session")).iter())
    {
        let data = std::fs::read(p).unwrap();
        let n = qnbd::testing::nbd_session(&data);
        let name = p.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed-") {
            // the server greeting alone is 18 bytes; a seed must get further than that
            assert!(n > 18, "{name}: only {n} reply bytes");
        }
        // every prefix of a seed is a truncated transcript: never a panic or a hang
        if name.starts_with("seed-structured") {
            for cut in 0..data.len() {
                qnbd::testing::nbd_session(&data[..cut]);
            }
        }
    }
}

/// The same corpus through a real socket and the ring data plane (the connection moves to a
/// plane after negotiation, as in `qnbd serve`): every transcript ends with the server closing
/// the connection, never a hang or a panic; every transcript that enters transmission on the
/// threaded path is handed to a plane (never served on the negotiation thread instead); and a
/// seed gets the same number of reply bytes as on the threaded path (the replies of a
/// transcript do not depend on the path). Where the kernel refuses io_uring the test is
/// skipped, except under CI.
#[test]
fn nbd_session_corpus_replays_on_the_ring_plane() {
    use qnbd::nbd::server::ConnEnd;

    let what = "nbd_session corpus on the ring plane";
    if let Err(e) = qnbd::testing::ring_plane_available() {
        qcow2_spec_tests::skip(what, &format!("the kernel refuses io_uring here ({e})"));
        return;
    }
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = corpus_inputs(&fuzz.join("corpus/nbd_session"));
    assert!(!corpus.is_empty(), "empty nbd_session corpus");
    let (mut replayed, mut compared, mut handed_over) = (0, 0, 0);
    for p in corpus
        .iter()
        .chain(corpus_inputs(&fuzz.join("artifacts/nbd_session")).iter())
    {
        let data = std::fs::read(p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        let Some((n, end)) = qnbd::testing::nbd_plane_session_end(&data) else {
            panic!("{name}: the plane session could not be set up although io_uring is available");
        };
        let (threaded_n, threaded_end) = qnbd::testing::nbd_session_end(&data);
        replayed += 1;
        let want = match threaded_end {
            ConnEnd::Negotiated => ConnEnd::HandedOver,
            other => other,
        };
        assert_eq!(
            end, want,
            "{name}: ended {end:?} with planes, {threaded_end:?} on the threaded path"
        );
        if end == ConnEnd::HandedOver {
            handed_over += 1;
        }
        if name.starts_with("seed-") {
            assert_eq!(
                n, threaded_n,
                "{name}: reply bytes differ between the plane and the threaded path"
            );
            compared += 1;
        }
    }
    eprintln!("{replayed} transcripts, {handed_over} served on a plane, {compared} seeds compared");
    assert!(compared > 0, "no seed transcript compared");
    assert!(handed_over > 0, "no transcript reached a plane");
}
