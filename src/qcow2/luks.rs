//! LUKS1 header of an encrypted qcow2 image (qcow2 spec, "Full disk encryption header
//! pointer"), parsed for `info` only: qnbd never decrypts, and refuses I/O on encrypted images.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};

/// LUKS1 on-disk header length (fixed part + 8 key slots).
pub const LUKS_HEADER_LEN: usize = 592;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00AC_71F3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlot {
    pub active: bool,
    pub iterations: u32,
    pub key_offset_sectors: u32,
    pub stripes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    pub payload_offset_sectors: u32,
    pub key_bytes: u32,
    pub mk_digest_iter: u32,
    pub uuid: String,
    pub slots: Vec<LuksSlot>,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl LuksHeader {
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < LUKS_HEADER_LEN || &b[..6] != MAGIC {
            return Err(Error::invalid("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::unsupported(format!(
                "Unsupported LUKS version {version}"
            )));
        }
        let slots = (0..8)
            .map(|i| {
                let s = &b[208 + i * 48..208 + (i + 1) * 48];
                LuksSlot {
                    active: be32(s) == SLOT_ACTIVE,
                    iterations: be32(&s[4..]),
                    key_offset_sectors: be32(&s[40..]),
                    stripes: be32(&s[44..]),
                }
            })
            .collect();
        Ok(LuksHeader {
            cipher_name: cstr(&b[8..40]),
            cipher_mode: cstr(&b[40..72]),
            hash_spec: cstr(&b[72..104]),
            payload_offset_sectors: be32(&b[104..]),
            key_bytes: be32(&b[108..]),
            mk_digest_iter: be32(&b[164..]),
            uuid: cstr(&b[168..208]),
            slots,
        })
    }

    /// QEMU's `QCryptoBlockInfoLUKS` as qemu-img info prints it.
    pub fn info_json(&self) -> Value {
        // "xts-plain64" -> mode xts, ivgen plain64; "cbc-essiv:sha256" -> ivgen essiv + hash
        let (mode, ivgen) = self
            .cipher_mode
            .split_once('-')
            .unwrap_or((self.cipher_mode.as_str(), "plain"));
        let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
            Some((a, h)) => (a, Some(h)),
            None => (ivgen, None),
        };
        let key_bits = if mode == "xts" {
            self.key_bytes * 4
        } else {
            self.key_bytes * 8
        };
        let slots: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                if s.active {
                    json!({"active": true, "iters": s.iterations,
                           "key-offset": u64::from(s.key_offset_sectors) * 512,
                           "stripes": s.stripes})
                } else {
                    json!({"active": false, "key-offset": u64::from(s.key_offset_sectors) * 512})
                }
            })
            .collect();
        let mut m = Map::new();
        m.insert("ivgen-alg".into(), json!(ivgen_alg));
        if let Some(h) = ivgen_hash {
            m.insert("ivgen-hash-alg".into(), json!(h));
        }
        m.insert("detached-header".into(), json!(false));
        m.insert("hash-alg".into(), json!(self.hash_spec));
        m.insert(
            "cipher-alg".into(),
            json!(format!("{}-{}", self.cipher_name, key_bits)),
        );
        m.insert("uuid".into(), json!(self.uuid));
        m.insert("format".into(), json!("luks"));
        m.insert("cipher-mode".into(), json!(mode));
        m.insert("slots".into(), Value::Array(slots));
        m.insert(
            "payload-offset".into(),
            json!(u64::from(self.payload_offset_sectors) * 512),
        );
        m.insert("master-key-iters".into(), json!(self.mk_digest_iter));
        Value::Object(m)
    }
}
