//! Write-side bad inputs (`bad-inputs.md` 19, 22, 24, 26, 61): corrupt images are not written,
//! writes that would land on metadata or far past the end are refused and mark the image
//! corrupt, nothing already on disk is damaged, and out-of-range writes are plain errors.

use qnbd::error::ErrorKind;
use qnbd::open::{open_image, OpenOptions};
use std::path::Path;
use std::process::Command;

/// qemu-img and qemu-io, or a printed skip (a failure under CI).
fn have() -> bool {
    qcow2_spec_tests::require_tools("write-side bad inputs", &["qemu-img", "qemu-io"])
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// A 4 MiB image with data in cluster 0 and 1; returns (path, L2 table offset, reftable offset).
fn image(dir: &Path) -> (String, u64, u64) {
    let p = dir.join("w.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("4M")
        .status()
        .unwrap()
        .success());
    assert!(Command::new("qemu-io")
        .args(["-c", "write -P 1 0 128k"])
        .arg(&p)
        .output()
        .unwrap()
        .status
        .success());
    let b = std::fs::read(&p).unwrap();
    let l1 = be64(&b, 40) as usize;
    let l2 = be64(&b, l1) & 0x00ff_ffff_ffff_fe00;
    let rt = be64(&b, 48);
    (p.display().to_string(), l2, rt)
}

fn poke(path: &str, off: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

fn corrupt_bit(path: &str) -> bool {
    let b = std::fs::read(path).unwrap();
    be64(&b, 72) & 2 != 0
}

#[test]
fn case_19_corrupt_image_is_not_opened_read_write() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _, _) = image(dir.path());
    poke(&p, 72, 2);
    let e = open_image(&p, &rw()).unwrap_err();
    assert!(
        e.to_string()
            .contains("Image is corrupt; cannot be opened read/write"),
        "{e}"
    );
    let ro = open_image(&p, &OpenOptions::default()).expect("read-only open");
    let mut buf = vec![0u8; 4096];
    ro.chain.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 1));
}

#[test]
fn case_22_unaligned_data_offset_fails_and_marks_corrupt() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, l2, _) = image(dir.path());
    let before = std::fs::read(&p).unwrap();
    let entry = be64(&before, l2 as usize);
    poke(&p, l2, entry | 0x200);
    let img = open_image(&p, &rw()).unwrap();
    let e = img.chain.write(100, &[9u8; 100], false).unwrap_err();
    assert!(e.to_string().contains("unaligned"), "{e}");
    let mut buf = vec![0u8; 512];
    assert!(img.chain.read(0, &mut buf).is_err());
    // later writes are refused, also to healthy clusters
    assert!(img.chain.write(3 << 20, &[9u8; 512], false).is_err());
    drop(img);
    assert!(corrupt_bit(&p), "corrupt bit not set");
}

#[test]
fn case_24_write_into_metadata_is_prevented() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, l2, rt) = image(dir.path());
    // cluster 1's entry now points at the refcount table, COPIED set
    poke(&p, l2 + 8, rt | (1 << 63));
    let table_before = std::fs::read(&p).unwrap()[rt as usize..rt as usize + 512].to_vec();
    let img = open_image(&p, &rw()).unwrap();
    let e = img.chain.write(65536, &[0xee; 4096], false).unwrap_err();
    assert!(
        e.to_string()
            .contains("Preventing invalid write on metadata"),
        "{e}"
    );
    drop(img);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(&after[rt as usize..rt as usize + 512], &table_before[..]);
    assert!(corrupt_bit(&p));
}

#[test]
fn case_26_data_offset_far_past_eof_is_an_error_not_growth() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, l2, _) = image(dir.path());
    poke(&p, l2 + 8, (1u64 << 40) | (1 << 63));
    let len_before = std::fs::metadata(&p).unwrap().len();
    let img = open_image(&p, &rw()).unwrap();
    let mut buf = vec![0u8; 512];
    let e = img.chain.read(65536, &mut buf).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    drop(img);
    assert!(std::fs::metadata(&p).unwrap().len() < len_before + (1 << 30));
}

#[test]
fn case_61_out_of_range_writes_are_errors() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _, _) = image(dir.path());
    let img = open_image(&p, &rw()).unwrap();
    let size = img.chain.size();
    let e = img.chain.write(size - 10, &[1u8; 20], false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    let e = img
        .chain
        .write(u64::MAX - 5, &[1u8; 20], false)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    assert!(img
        .chain
        .write_zeroes(size, 1, qnbd::block::ZeroMode::MayUnmap, false)
        .is_err());
    assert!(img.chain.discard(0, size + 1, false).is_err());
    drop(img);
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success());
}
