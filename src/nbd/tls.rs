//! TLS for the server: credentials, the handshake, client authorization, and the encrypted
//! transport the connection driver reads and writes through.
//!
//! Credentials follow QEMU's layouts so that a directory made for `qemu-nbd --object
//! tls-creds-x509,...` or a `keys.psk` made by `psktool` works unchanged:
//! * X.509: `ca-cert.pem` (required), `server-cert.pem`, `server-key.pem`, optional
//!   `ca-crl.pem`; TLS 1.3 only. Client certificates are required and verified against the
//!   CA unless `verify-peer` is off.
//! * PSK: lines `username:hexkey`; the client's PSK identity is the user name. TLS 1.3
//!   (OpenSSL's PSK callback, `TLS_AES_128_GCM_SHA256`, which GnuTLS clients offer), or TLS
//!   1.2 with the `ECDHE-PSK`/`PSK` AEAD suites for older peers.
//!
//! Authorization (`--tls-authz`) compares the client's identity with a list: the subject
//! distinguished name of its certificate, written as QEMU writes it (GnuTLS's
//! `gnutls_x509_crt_get_dn`: RDNs in certificate order, RFC 4514 escaping, e.g.
//! `C=GB,O=Example,CN=client`) so that an `authz-simple` identity that works with qemu-nbd
//! works here, or the PSK user name.
//!
//! The handshake runs on a non-blocking socket under the negotiation deadline, so a client
//! that stalls or dribbles bytes in the middle of it is dropped like any other slow client.
//! The resulting [`TlsStream`] is shared by the connection's reader thread and the workers
//! that write replies: one lock around the OpenSSL session, held only for single non-blocking
//! calls, and `poll(2)` outside the lock.

use super::socket::Socket;
use crate::error::{Error, ErrorKind, Result};
use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode,
    SslOptions, SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509NameRef, X509};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the server's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A QEMU `tls-creds-x509` directory.
    X509 { dir: PathBuf, verify_peer: bool },
    /// A GnuTLS `username:hexkey` file (QEMU's `DIR/keys.psk`).
    Psk { file: PathBuf },
}

/// Which kind of identity a client proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    X509,
    Psk,
}

/// A configured TLS server side, shared by every connection.
pub struct TlsServer {
    ctx: SslContext,
    kind: Kind,
    /// Identities allowed in (`--tls-authz`); `None` lets every authenticated client in.
    authz: Option<Vec<String>>,
    /// The credentials' directory (x509) or key file (PSK), named in failure messages.
    source: PathBuf,
}

thread_local! {
    /// What the handshake running on this thread learnt before it failed (the callbacks run
    /// inside `SSL_accept`, on the accepting thread): the PSK identity the client offered and
    /// whether it is known, or the client certificate verification refused and why.
    static ATTEMPT: std::cell::RefCell<Attempt> = const { std::cell::RefCell::new(Attempt::None) };
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    None,
    Psk { user: String, known: bool },
    Refused { subject: String, why: String },
}

fn note(a: Attempt) {
    ATTEMPT.with(|c| *c.borrow_mut() = a);
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("kind", &self.kind)
            .field("authz", &self.authz)
            .finish()
    }
}

fn creds_err(what: impl std::fmt::Display, e: ErrorStack) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("{what}: {e}"))
}

fn need_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "Unable to access credentials {}: No such file or directory",
                p.display()
            ),
        ));
    }
    if p.to_str().is_none() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("credentials path {} is not UTF-8", p.display()),
        ));
    }
    Ok(p)
}

/// Parse a GnuTLS PSK file: `username:hexkey` per line; blank lines and `#` comments skipped.
pub fn parse_psk_file(text: &str) -> std::result::Result<HashMap<String, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hex) = line
            .rsplit_once(':')
            .ok_or_else(|| format!("line {}: expected username:hexkey", i + 1))?;
        if user.is_empty() {
            return Err(format!("line {}: empty username", i + 1));
        }
        let hex = hex.trim();
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * 256 {
            return Err(format!(
                "line {}: the key must be 1 to 256 bytes of hex digits",
                i + 1
            ));
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|j| u8::from_str_radix(&hex[j..j + 2], 16))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| format!("line {}: the key is not hexadecimal", i + 1))?;
        keys.insert(user.to_string(), key);
    }
    if keys.is_empty() {
        return Err("no keys".into());
    }
    Ok(keys)
}

/// The PSK identity a client used, kept on its session for authorization.
fn psk_identity_index() -> Option<openssl::ex_data::Index<Ssl, String>> {
    static IDX: OnceLock<Option<openssl::ex_data::Index<Ssl, String>>> = OnceLock::new();
    *IDX.get_or_init(|| Ssl::new_ex_index::<String>().ok())
}

/// Settings both kinds share: no renegotiation, no session resumption (every connection
/// authenticates in full), partial writes so one lock hold writes one record, TLS 1.3 suites
/// in the server's order.
fn common(b: &mut SslContextBuilder) -> std::result::Result<(), ErrorStack> {
    // AES-GCM first, on the server's order: GnuTLS clients put ChaCha20 first for PSK, which
    // halves throughput on CPUs with AES instructions
    b.set_options(
        SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    b.set_ciphersuites(
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
    )?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_num_tickets(0)?;
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    b.set_session_id_context(b"qnbd")?;
    Ok(())
}

impl TlsServer {
    pub fn new(creds: &Credentials, authz: Option<Vec<String>>) -> Result<TlsServer> {
        let mut b = SslContextBuilder::new(SslMethod::tls_server())
            .map_err(|e| creds_err("TLS setup failed", e))?;
        common(&mut b).map_err(|e| creds_err("TLS setup failed", e))?;
        let kind = match creds {
            Credentials::X509 { dir, verify_peer } => {
                let ca = need_file(dir, "ca-cert.pem")?;
                let cert = need_file(dir, "server-cert.pem")?;
                let key = need_file(dir, "server-key.pem")?;
                b.set_min_proto_version(Some(SslVersion::TLS1_3))
                    .map_err(|e| creds_err("TLS setup failed", e))?;
                b.set_certificate_chain_file(&cert)
                    .map_err(|e| creds_err(format!("Cannot load {}", cert.display()), e))?;
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(|e| creds_err(format!("Cannot load {}", key.display()), e))?;
                b.check_private_key()
                    .map_err(|e| creds_err("server-key.pem does not match server-cert.pem", e))?;
                b.set_ca_file(&ca)
                    .map_err(|e| creds_err(format!("Cannot load {}", ca.display()), e))?;
                let pem = std::fs::read(&ca)
                    .map_err(|e| Error::io(format!("Cannot read {}", ca.display()), e))?;
                let cas = X509::stack_from_pem(&pem)
                    .map_err(|e| creds_err(format!("Cannot load {}", ca.display()), e))?;
                let mut names =
                    openssl::stack::Stack::new().map_err(|e| creds_err("TLS setup failed", e))?;
                for c in &cas {
                    let n = c
                        .subject_name()
                        .to_owned()
                        .map_err(|e| creds_err("TLS setup failed", e))?;
                    names
                        .push(n)
                        .map_err(|e| creds_err("TLS setup failed", e))?;
                }
                b.set_client_ca_list(names);
                let crl = dir.join("ca-crl.pem");
                if crl.is_file() {
                    let crl = need_file(dir, "ca-crl.pem")?;
                    let store = b.cert_store_mut();
                    store
                        .add_lookup(X509Lookup::file())
                        .and_then(|l| l.load_crl_file(&crl, SslFiletype::PEM))
                        .map_err(|e| creds_err(format!("Cannot load {}", crl.display()), e))?;
                    store
                        .set_flags(X509VerifyFlags::CRL_CHECK)
                        .map_err(|e| creds_err("TLS setup failed", e))?;
                }
                let mode = if *verify_peer {
                    SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
                } else {
                    SslVerifyMode::NONE
                };
                b.set_verify_callback(mode, |ok, ctx| {
                    if !ok {
                        let subject = ctx
                            .current_cert()
                            .map_or_else(|| "?".into(), |c| gnutls_dn(c.subject_name()));
                        note(Attempt::Refused {
                            subject,
                            why: ctx.error().error_string().to_string(),
                        });
                    }
                    ok
                });
                Kind::X509
            }
            Credentials::Psk { file } => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    Error::io(format!("Unable to read PSK file {}", file.display()), e)
                })?;
                let keys = parse_psk_file(&text).map_err(|m| {
                    Error::new(
                        ErrorKind::InvalidArgument,
                        format!("PSK file {}: {m}", file.display()),
                    )
                })?;
                let idx = psk_identity_index().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidArgument, "TLS setup failed (ex_data)")
                })?;
                b.set_min_proto_version(Some(SslVersion::TLS1_2))
                    .map_err(|e| creds_err("TLS setup failed", e))?;
                // TLS 1.2 fallback: forward-secret PSK first, AEAD or SHA-2 suites only
                b.set_cipher_list(
                    "ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:\
                     PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305:\
                     ECDHE-PSK-AES128-CBC-SHA256:ECDHE-PSK-AES256-CBC-SHA384",
                )
                .map_err(|e| creds_err("TLS setup failed", e))?;
                b.set_psk_server_callback(move |ssl, identity, psk| {
                    let Some(user) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                        note(Attempt::Psk {
                            user: String::from_utf8_lossy(identity.unwrap_or_default()).into(),
                            known: false,
                        });
                        return Ok(0);
                    };
                    match keys.get(user) {
                        Some(k) if k.len() <= psk.len() => {
                            psk[..k.len()].copy_from_slice(k);
                            ssl.set_ex_data(idx, user.to_string());
                            note(Attempt::Psk {
                                user: user.into(),
                                known: true,
                            });
                            Ok(k.len())
                        }
                        // unknown user: no key, the handshake fails
                        _ => {
                            note(Attempt::Psk {
                                user: user.into(),
                                known: false,
                            });
                            Ok(0)
                        }
                    }
                });
                Kind::Psk
            }
        };
        let source = match creds {
            Credentials::X509 { dir, .. } => dir.clone(),
            Credentials::Psk { file } => file.clone(),
        };
        Ok(TlsServer {
            ctx: b.build(),
            kind,
            authz,
            source,
        })
    }

    /// A failed handshake in words an operator can act on: which credential, which check.
    /// `reason` is OpenSSL's, kept at the end.
    fn explain(&self, reason: &str, io: bool, verify: Option<&str>, attempt: Attempt) -> String {
        let src = self.source.display();
        let r = reason.to_ascii_lowercase();
        match (self.kind, attempt) {
            (Kind::Psk, Attempt::Psk { user, known: false }) => {
                format!("PSK identity '{user}' is not in {src} ({reason})")
            }
            (Kind::Psk, Attempt::Psk { user, known: true })
                if r.contains("binder")
                    || r.contains("decrypt")
                    || r.contains("bad record mac") =>
            {
                format!(
                    "the client's key for PSK identity '{user}' is not the one in {src} ({reason})"
                )
            }
            (Kind::X509, Attempt::Refused { subject, why }) => format!(
                "client certificate '{subject}' refused: {why} (trusted CAs: {src}/ca-cert.pem)"
            ),
            (Kind::X509, _) if r.contains("did not return a certificate") => format!(
                "the client sent no certificate; verify-peer=on requires one issued by a CA in \
                 {src}/ca-cert.pem ({reason})"
            ),
            (Kind::X509, _) if r.contains("alert unknown ca") => format!(
                "the client does not trust the CA that issued {src}/server-cert.pem ({reason})"
            ),
            (Kind::X509, _)
                if r.contains("alert bad certificate")
                    || r.contains("alert certificate unknown") =>
            {
                format!(
                    "the client refused {src}/server-cert.pem: check that its names (dns_name, \
                     ip_address) include the host the client connects to ({reason})"
                )
            }
            (Kind::X509, _) if r.contains("alert certificate expired") => {
                format!("the client says {src}/server-cert.pem has expired ({reason})")
            }
            (_, _) if r.contains("unsupported protocol") || r.contains("version") => {
                format!(
                "the client offers no TLS version the server accepts (TLS {} and later): {reason}",
                if self.kind == Kind::X509 { "1.3" } else { "1.2" }
            )
            }
            (_, _) if r.contains("no shared cipher") || r.contains("no suitable") => {
                format!("the client offers no cipher suite or key exchange the server accepts ({reason})")
            }
            (_, _) if r.contains("wrong version number") || r.contains("http request") => {
                format!("the client did not speak TLS after STARTTLS ({reason})")
            }
            _ => match verify {
                Some(v) => format!("{reason} ({v})"),
                None if io => format!("{reason} (before the handshake completed)"),
                None => reason.to_string(),
            },
        }
    }

    /// Run the server side of the handshake on `sock` (which becomes non-blocking), before
    /// `deadline`, then check the client's identity against `--tls-authz`.
    pub fn accept(
        &self,
        sock: Socket,
        deadline: Option<Instant>,
    ) -> std::result::Result<TlsStream, String> {
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let fd = sock.as_raw_fd();
        let ssl = Ssl::new(&self.ctx).map_err(|e| e.to_string())?;
        note(Attempt::None);
        let mut res = ssl.accept(sock);
        let stream = loop {
            match res {
                Ok(s) => break s,
                Err(HandshakeError::WouldBlock(mid)) => {
                    let ev = if mid.error().code() == ErrorCode::WANT_WRITE {
                        libc::POLLOUT
                    } else {
                        libc::POLLIN
                    };
                    if let Err(e) = wait(fd, ev, deadline) {
                        return Err(if e.kind() == io::ErrorKind::TimedOut {
                            "TLS handshake timed out".into()
                        } else {
                            format!("TLS handshake failed: {e}")
                        });
                    }
                    res = mid.handshake();
                }
                Err(HandshakeError::SetupFailure(e)) => return Err(format!("TLS setup: {e}")),
                Err(HandshakeError::Failure(mid)) => {
                    let e = mid.error();
                    let (reason, io) = match (e.ssl_error(), e.io_error()) {
                        (Some(s), _) => (
                            s.errors().last().map_or_else(
                                || s.to_string(),
                                |r| r.reason().unwrap_or("unknown error").to_string(),
                            ),
                            false,
                        ),
                        (None, Some(io)) => (io.to_string(), true),
                        (None, None) => ("the client closed the connection".into(), true),
                    };
                    let verify = mid.ssl().verify_result();
                    let verify = (verify.as_raw() != 0).then(|| verify.error_string().to_string());
                    let attempt = ATTEMPT.with(|c| c.replace(Attempt::None));
                    return Err(format!(
                        "TLS handshake failed: {}",
                        self.explain(&reason, io, verify.as_deref(), attempt)
                    ));
                }
            }
        };
        let identity = match self.kind {
            Kind::X509 => stream
                .ssl()
                .peer_certificate()
                .map(|c| gnutls_dn(c.subject_name())),
            Kind::Psk => psk_identity_index()
                .and_then(|i| stream.ssl().ex_data(i))
                .cloned(),
        };
        if let Some(allowed) = &self.authz {
            let kind = match self.kind {
                Kind::X509 => "x509",
                Kind::Psk => "PSK",
            };
            match &identity {
                Some(id) if allowed.iter().any(|a| a == id) => {}
                Some(id) => return Err(format!("TLS {kind} authz check for {id} is denied")),
                None => {
                    return Err(format!(
                        "TLS {kind} authz check failed: the client has no identity"
                    ))
                }
            }
        }
        let summary = format!(
            "{}, {}",
            stream.ssl().version_str(),
            stream
                .ssl()
                .current_cipher()
                .map_or("no cipher", |c| c.name())
        );
        Ok(TlsStream {
            shared: Arc::new(Shared {
                summary,
                ssl: Mutex::new(stream),
                fd,
                timeout: Mutex::new(None),
                identity,
            }),
        })
    }
}

/// A distinguished name the way QEMU's authorization sees it (`gnutls_x509_crt_get_dn`): RDNs
/// in the order the certificate encodes them, `,` between them, special characters escaped
/// with `\` as RFC 4514 says.
pub fn gnutls_dn(name: &X509NameRef) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in name.entries() {
        let nid = e.object().nid();
        let key = match nid.short_name() {
            Ok("emailAddress") => "EMAIL".to_string(),
            Ok(s) => s.to_string(),
            Err(_) => e.object().to_string(),
        };
        let val = e.data().to_string().unwrap_or_default();
        parts.push(format!("{key}={}", escape_dn_value(&val)));
    }
    parts.join(",")
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Wait until `fd` is ready for `events`, or until `deadline` (`TimedOut`).
fn wait(fd: RawFd, events: libc::c_short, deadline: Option<Instant>) -> io::Result<()> {
    loop {
        let ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
                }
                left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
            }
        };
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let rc = match crate::io::sys::poll(std::slice::from_mut(&mut p), ms) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if rc > 0 {
            // readiness, hang-up or error: the next TLS call tells which
            return Ok(());
        }
    }
}

/// Client credentials: a QEMU `tls-creds-x509,endpoint=client` directory (`ca-cert.pem`, and
/// `client-cert.pem` + `client-key.pem` when the server asks for a certificate) or a
/// `tls-creds-psk,endpoint=client` key file with the identity to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCredentials {
    X509 { dir: PathBuf, verify_peer: bool },
    Psk { file: PathBuf, username: String },
}

/// The client side of TLS (`serve -L` against a server that requires TLS).
pub struct TlsClient {
    ctx: SslContext,
    kind: Kind,
    verify_peer: bool,
    source: PathBuf,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl TlsClient {
    pub fn new(creds: &ClientCredentials) -> Result<TlsClient> {
        let mut b = SslContextBuilder::new(SslMethod::tls_client())
            .map_err(|e| creds_err("TLS setup failed", e))?;
        b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET);
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(|e| creds_err("TLS setup failed", e))?;
        let (kind, verify_peer, source) = match creds {
            ClientCredentials::X509 { dir, verify_peer } => {
                let ca = need_file(dir, "ca-cert.pem")?;
                b.set_ca_file(&ca)
                    .map_err(|e| creds_err(format!("Cannot load {}", ca.display()), e))?;
                let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
                if cert.is_file() && key.is_file() {
                    b.set_certificate_chain_file(&cert)
                        .map_err(|e| creds_err(format!("Cannot load {}", cert.display()), e))?;
                    b.set_private_key_file(&key, SslFiletype::PEM)
                        .map_err(|e| creds_err(format!("Cannot load {}", key.display()), e))?;
                    b.check_private_key().map_err(|e| {
                        creds_err("client-key.pem does not match client-cert.pem", e)
                    })?;
                }
                b.set_verify(if *verify_peer {
                    SslVerifyMode::PEER
                } else {
                    SslVerifyMode::NONE
                });
                (Kind::X509, *verify_peer, dir.clone())
            }
            ClientCredentials::Psk { file, username } => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    Error::io(format!("Unable to read PSK file {}", file.display()), e)
                })?;
                let keys = parse_psk_file(&text).map_err(|m| {
                    Error::new(
                        ErrorKind::InvalidArgument,
                        format!("PSK file {}: {m}", file.display()),
                    )
                })?;
                let key = keys.get(username).cloned().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "Username {username} not found in PSK file {}",
                            file.display()
                        ),
                    )
                })?;
                b.set_cipher_list(
                    "ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:\
                     PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305:\
                     ECDHE-PSK-AES128-CBC-SHA256:ECDHE-PSK-AES256-CBC-SHA384",
                )
                .map_err(|e| creds_err("TLS setup failed", e))?;
                let user = username.clone();
                b.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
                    let id = user.as_bytes();
                    if id.len() >= identity.len() || key.len() > psk.len() {
                        return Ok(0);
                    }
                    identity[..id.len()].copy_from_slice(id);
                    identity[id.len()] = 0;
                    psk[..key.len()].copy_from_slice(&key);
                    Ok(key.len())
                });
                b.set_verify(SslVerifyMode::NONE);
                (Kind::Psk, false, file.clone())
            }
        };
        Ok(TlsClient {
            ctx: b.build(),
            kind,
            verify_peer,
            source,
        })
    }

    /// Whether the server's certificate must be checked against a host name (QEMU refuses a
    /// connection without one: `No hostname for certificate validation`).
    pub fn needs_hostname(&self) -> bool {
        self.kind == Kind::X509 && self.verify_peer
    }

    /// Run the client handshake over `s`, checking the server's certificate against
    /// `hostname` (a DNS name or an IP address).
    pub fn connect<S: Read + Write>(&self, s: S, hostname: Option<&str>) -> Result<SslStream<S>> {
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| creds_err("TLS setup failed", e))?;
        if self.needs_hostname() {
            let host = hostname.ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    "No hostname for certificate validation",
                )
            })?;
            let param = ssl.param_mut();
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => param.set_ip(ip),
                Err(_) => param.set_host(host),
            }
            .map_err(|e| creds_err("TLS setup failed", e))?;
            if host.parse::<std::net::IpAddr>().is_err() {
                ssl.set_hostname(host)
                    .map_err(|e| creds_err("TLS setup failed", e))?;
            }
        }
        ssl.connect(s).map_err(|e| {
            let why = match &e {
                HandshakeError::Failure(mid) => {
                    let v = mid.ssl().verify_result();
                    if v.as_raw() != 0 {
                        let ca = self.source.join("ca-cert.pem");
                        match v.as_raw() {
                            62 | 64 => {
                                return Error::new(
                                    ErrorKind::InvalidArgument,
                                    format!(
                                        "Certificate does not match the hostname {}",
                                        hostname.unwrap_or("")
                                    ),
                                )
                            }
                            _ => format!(
                                "The server's certificate failed validation against {}: {}",
                                ca.display(),
                                v.error_string()
                            ),
                        }
                    } else {
                        let e = mid.error();
                        match (e.ssl_error(), e.io_error()) {
                            (Some(s), _) => s.errors().last().map_or_else(
                                || s.to_string(),
                                |r| r.reason().unwrap_or("unknown error").to_string(),
                            ),
                            (None, Some(io)) => io.to_string(),
                            (None, None) => "the server closed the connection".into(),
                        }
                    }
                }
                HandshakeError::SetupFailure(e) => e.to_string(),
                HandshakeError::WouldBlock(_) => "the socket would block".into(),
            };
            Error::new(
                ErrorKind::InvalidArgument,
                format!("TLS handshake failed: {why}"),
            )
        })
    }
}

struct Shared {
    ssl: Mutex<SslStream<Socket>>,
    /// The socket under the session, for poll and shutdown without taking the lock.
    fd: RawFd,
    timeout: Mutex<Option<Duration>>,
    identity: Option<String>,
    /// Protocol version and cipher suite, for the log.
    summary: String,
}

/// One TLS session, cloneable so that a reader and several writers can share it.
#[derive(Clone)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("fd", &self.shared.fd)
            .field("identity", &self.shared.identity)
            .finish()
    }
}

fn ssl_io_error(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::other(e.to_string()),
    }
}

impl TlsStream {
    /// The client's identity: certificate subject DN or PSK user name.
    pub fn identity(&self) -> Option<&str> {
        self.shared.identity.as_deref()
    }

    fn deadline(&self) -> Option<Instant> {
        let t = *self
            .shared
            .timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        t.map(|t| Instant::now() + t)
    }

    /// Protocol version and cipher suite.
    pub fn summary(&self) -> &str {
        &self.shared.summary
    }

    /// Send close_notify (best effort) and shut the socket down both ways.
    pub fn shutdown(&self) {
        if let Ok(mut s) = self.shared.ssl.try_lock() {
            let _ = s.shutdown();
        }
        // the fd belongs to the Socket owned by `shared.ssl`, alive as long as `self`
        crate::io::sys::shutdown_socket(self.shared.fd);
    }

    pub fn set_timeout(&self, d: Option<Duration>) {
        *self
            .shared
            .timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = d;
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.deadline();
        loop {
            let r = {
                let mut s = self
                    .shared
                    .ssl
                    .lock()
                    .map_err(|_| io::Error::other("TLS session lock poisoned"))?;
                s.ssl_read(buf)
            };
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::ZERO_RETURN => return Ok(0),
                ErrorCode::WANT_READ => wait(self.shared.fd, libc::POLLIN, deadline)?,
                ErrorCode::WANT_WRITE => wait(self.shared.fd, libc::POLLOUT, deadline)?,
                ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                _ => return Err(ssl_io_error(e)),
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.deadline();
        loop {
            let r = {
                let mut s = self
                    .shared
                    .ssl
                    .lock()
                    .map_err(|_| io::Error::other("TLS session lock poisoned"))?;
                s.ssl_write(buf)
            };
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::WANT_WRITE => wait(self.shared.fd, libc::POLLOUT, deadline)?,
                ErrorCode::WANT_READ => wait(self.shared.fd, libc::POLLIN, deadline)?,
                ErrorCode::ZERO_RETURN => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "TLS session closed",
                    ))
                }
                _ => return Err(ssl_io_error(e)),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_file_parses_gnutls_format() {
        let k = parse_psk_file("# keys\nalice:00ff10\n\nbob:ABCD\r\n").unwrap();
        assert_eq!(k["alice"], [0, 0xff, 0x10]);
        assert_eq!(k["bob"], [0xab, 0xcd]);
        assert!(parse_psk_file("alice:0g").is_err());
        assert!(parse_psk_file("alice:abc").is_err());
        assert!(parse_psk_file("alice").is_err());
        assert!(parse_psk_file("").is_err());
    }

    #[test]
    fn dn_is_written_like_gnutls() {
        let mut b = openssl::x509::X509NameBuilder::new().unwrap();
        b.append_entry_by_text("C", "GB").unwrap();
        b.append_entry_by_text("O", "Example, Ltd").unwrap();
        b.append_entry_by_text("CN", "client").unwrap();
        let n = b.build();
        assert_eq!(gnutls_dn(&n), "C=GB,O=Example\\, Ltd,CN=client");
    }
}
