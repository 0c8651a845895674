//! Entry points for fuzzing and property tests: open bytes as an image and exercise the read
//! side without touching the file system.

use crate::block::{Chain, Mapping};
use crate::error::Result;
use crate::io::mem::MemStorage;
use crate::open::open_storage_image;
use crate::qcow2::Qcow2Options;
use std::sync::Arc;

/// Open `data` as a qcow2 (or raw) image in memory, map it from start to end and read every
/// mapped run (bounded: at most 4096 runs and 64 MiB of reads).
pub fn open_and_map(data: &[u8]) -> Result<()> {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let dev = open_storage_image(storage, None, &Qcow2Options::default())?;
    let chain = Chain::new(vec![dev.clone()])?;
    let size = dev.size();
    let mut off = 0u64;
    let mut runs = 0;
    let mut read_budget: u64 = 64 << 20;
    let mut buf = Vec::new();
    while off < size && runs < 4096 {
        let e = chain.map_entry(off, size - off)?;
        let r = chain.resolve(off, size - off)?;
        let n = r.len.min(e.length).max(1);
        let want = n.min(1 << 20).min(read_budget);
        if want > 0 && !matches!(r.mapping, Mapping::Backing { .. }) {
            buf.resize(want as usize, 0);
            chain.read(off, &mut buf)?;
            read_budget -= want;
        }
        off += n;
        runs += 1;
    }
    Ok(())
}
