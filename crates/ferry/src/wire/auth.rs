//! Mutual challenge–response authentication with a shared token.
//!
//! Both ends hold the same secret (a token file). The token never crosses
//! the wire; each side proves it knows it by a MAC over fresh nonces:
//!
//! ```text
//! source → target  Hello{session}            target → source  Hello, AuthChallenge{Ns}
//! source → target  AuthResponse{mac_c, Nc}   target → source  AuthOk{mac_t} | AuthFail
//!
//! mac_c = HMAC-SHA256(token, "ferry-auth-v1 source" || session || Ns || Nc)
//! mac_t = HMAC-SHA256(token, "ferry-auth-v1 target" || session || Ns || Nc)
//! join  = HMAC-SHA256(token, "ferry-auth-v1 stream" || session || Ns || Nc || index u16 LE)
//! ```
//!
//! Different labels keep one side's proof from being replayed as the
//! other's; fixed-size fields make the MAC input unambiguous. MACs are
//! compared in constant time. Authentication admits a peer; it does not
//! encrypt or sign later frames (run migrations on a trusted network or
//! inside a tunnel — see docs/protocol.md).

use super::WireError;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A 32-byte random challenge.
pub type Nonce = [u8; 32];
/// An HMAC-SHA256 tag.
pub type Mac = [u8; 32];

const LABEL_SOURCE: &[u8] = b"ferry-auth-v1 source";
const LABEL_TARGET: &[u8] = b"ferry-auth-v1 target";
const LABEL_STREAM: &[u8] = b"ferry-auth-v1 stream";

/// Largest token file accepted.
pub const MAX_TOKEN_FILE: u64 = 64 << 10;
/// Tokens shorter than this (after trimming) are accepted with a warning.
pub const MIN_GOOD_TOKEN: usize = 16;

/// Identifies one migration session; chosen at random by the source.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> Result<SessionId, WireError> {
        let mut b = [0u8; 16];
        fill_random(&mut b)?;
        Ok(SessionId(b))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), WireError> {
    getrandom::fill(buf).map_err(|e| WireError::Random(e.to_string()))
}

/// A fresh random nonce.
pub fn random_nonce() -> Result<Nonce, WireError> {
    let mut n = [0u8; 32];
    fill_random(&mut n)?;
    Ok(n)
}

/// What the MACs of one session are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthContext {
    pub session: SessionId,
    /// The target's challenge.
    pub target_nonce: Nonce,
    /// The source's challenge.
    pub source_nonce: Nonce,
}

/// The shared secret. Its bytes are never printed or sent.
#[derive(Clone)]
pub struct AuthToken {
    key: Vec<u8>,
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthToken(<{} bytes, redacted>)", self.key.len())
    }
}

impl AuthToken {
    /// A token from bytes; surrounding whitespace is trimmed, and an empty
    /// token is refused.
    pub fn new(bytes: &[u8]) -> Result<AuthToken, WireError> {
        let key = bytes.trim_ascii();
        if key.is_empty() {
            return Err(WireError::Auth("the token is empty".into()));
        }
        Ok(AuthToken { key: key.to_vec() })
    }

    /// A fresh random token (64 hex characters), e.g. for `ferry agent
    /// --init-token`.
    pub fn generate() -> Result<(AuthToken, String), WireError> {
        let raw = random_nonce()?;
        let text: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Ok((AuthToken::new(text.as_bytes())?, text))
    }

    fn mac(&self, label: &[u8], ctx: &AuthContext, extra: &[u8]) -> Hmac<Sha256> {
        // new_from_slice accepts any key length for HMAC.
        let mut m = match <Hmac<Sha256>>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        m.update(label);
        m.update(&ctx.session.0);
        m.update(&ctx.target_nonce);
        m.update(&ctx.source_nonce);
        m.update(extra);
        m
    }

    /// The source's proof (`AuthResponse.mac`).
    pub fn source_proof(&self, ctx: &AuthContext) -> Mac {
        self.mac(LABEL_SOURCE, ctx, &[])
            .finalize()
            .into_bytes()
            .into()
    }

    /// The target's proof (`AuthOk.mac`).
    pub fn target_proof(&self, ctx: &AuthContext) -> Mac {
        self.mac(LABEL_TARGET, ctx, &[])
            .finalize()
            .into_bytes()
            .into()
    }

    /// The proof on a `StreamJoin` for page connection `index`.
    pub fn join_proof(&self, ctx: &AuthContext, index: u16) -> Mac {
        self.mac(LABEL_STREAM, ctx, &index.to_le_bytes())
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time check of a source's proof.
    pub fn verify_source(&self, ctx: &AuthContext, mac: &Mac) -> bool {
        self.mac(LABEL_SOURCE, ctx, &[]).verify_slice(mac).is_ok()
    }

    /// Constant-time check of a target's proof.
    pub fn verify_target(&self, ctx: &AuthContext, mac: &Mac) -> bool {
        self.mac(LABEL_TARGET, ctx, &[]).verify_slice(mac).is_ok()
    }

    /// Constant-time check of a stream join proof.
    pub fn verify_join(&self, ctx: &AuthContext, index: u16, mac: &Mac) -> bool {
        self.mac(LABEL_STREAM, ctx, &index.to_le_bytes())
            .verify_slice(mac)
            .is_ok()
    }
}

#[cold]
fn unreachable_hmac() -> ! {
    // HMAC takes keys of any length; hmac's error type exists for MACs
    // with fixed key sizes only.
    unreachable!("HMAC-SHA256 accepts keys of any length")
}

/// Reads the shared token from `path`.
///
/// Refused: anything but a regular file, files over 64 KiB, files that
/// others (not owner, not group) may read or write, and empty files.
/// Files the group may read and tokens under 16 bytes are accepted with a
/// warning. Surrounding whitespace (a trailing newline) is trimmed.
pub fn load_token(path: &Path) -> Result<AuthToken, WireError> {
    let bad = |why: String| WireError::Token {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_TOKEN_FILE {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_TOKEN_FILE} a token file may have",
            meta.len()
        )));
    }
    let mode = meta.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(bad(format!(
            "mode {:o} lets other users read or change the token; run chmod 600 on it",
            mode & 0o7777
        )));
    }
    if mode & 0o070 != 0 {
        tracing::warn!(
            path = %path.display(),
            "token file mode {:o} lets its group read it; chmod 600 is safer",
            mode & 0o7777
        );
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Err(bad("the token file is empty".into()));
    }
    if trimmed.len() < MIN_GOOD_TOKEN {
        tracing::warn!(
            path = %path.display(),
            "token is only {} bytes; use at least {MIN_GOOD_TOKEN} random bytes",
            trimmed.len()
        );
    }
    AuthToken::new(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ctx() -> AuthContext {
        AuthContext {
            session: SessionId([9; 16]),
            target_nonce: [1; 32],
            source_nonce: [2; 32],
        }
    }

    #[test]
    fn same_token_verifies_and_other_token_does_not() {
        let a = AuthToken::new(b"correct horse battery staple\n").unwrap();
        let b = AuthToken::new(b"correct horse battery staple").unwrap();
        let c = AuthToken::new(b"wrong").unwrap();
        let m = a.source_proof(&ctx());
        assert!(b.verify_source(&ctx(), &m));
        assert!(!c.verify_source(&ctx(), &m));
        // Bound to everything in the context and to the role.
        let mut other = ctx();
        other.source_nonce[0] ^= 1;
        assert!(!a.verify_source(&other, &m));
        let mut other = ctx();
        other.session.0[15] ^= 1;
        assert!(!a.verify_source(&other, &m));
        assert!(
            !a.verify_target(&ctx(), &m),
            "a source proof is not a target proof"
        );
        let j = a.join_proof(&ctx(), 1);
        assert!(a.verify_join(&ctx(), 1, &j));
        assert!(!a.verify_join(&ctx(), 2, &j));
    }

    #[test]
    fn known_answer_hmac_sha256() {
        // RFC 4231 test case 2 checks the primitive we build on.
        let mut m = <Hmac<Sha256>>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let out: [u8; 32] = m.finalize().into_bytes().into();
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = AuthToken::new(b"supersecret").unwrap();
        assert!(!format!("{t:?}").contains("supersecret"));
        assert!(AuthToken::new(b"  \n").is_err());
    }

    #[test]
    fn load_token_checks_file() {
        let dir = std::env::temp_dir().join(format!("ferry-wire-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        let write = |content: &[u8], mode: u32| {
            let mut f = std::fs::File::create(&p).unwrap();
            f.write_all(content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(b"0123456789abcdef0123\n", 0o600);
        let t = load_token(&p).unwrap();
        assert!(t.verify_source(
            &ctx(),
            &AuthToken::new(b"0123456789abcdef0123")
                .unwrap()
                .source_proof(&ctx())
        ));
        write(b"0123456789abcdef0123\n", 0o640);
        assert!(load_token(&p).is_ok(), "group-readable is a warning");
        write(b"0123456789abcdef0123\n", 0o644);
        assert!(matches!(load_token(&p), Err(WireError::Token { .. })));
        write(b" \n\t", 0o600);
        assert!(matches!(load_token(&p), Err(WireError::Token { .. })));
        assert!(load_token(&dir).is_err());
        assert!(load_token(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_tokens_differ() {
        let (_, a) = AuthToken::generate().unwrap();
        let (_, b) = AuthToken::generate().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_ne!(SessionId::random().unwrap(), SessionId::random().unwrap());
    }
}
