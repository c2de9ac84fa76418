//! The admin credential: a bearer token, read from `--admin-token-file`, that the
//! membership and leadership routes require (see docs/security.md).
//!
//! Only a SHA-256 digest of the token is kept; a presented token is hashed and the two
//! digests are compared in constant time, so neither the token's bytes nor its length
//! leak through response timing.

use std::path::Path;

use hyper::header::{HeaderMap, AUTHORIZATION};
use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;

/// Shortest accepted token (bytes): a guessable admin token is no credential.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted token file.
const MAX_TOKEN_FILE: u64 = 4096;

/// The admin token (its digest). `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unreadable file.
    #[error("--admin-token-file {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Unusable content.
    #[error("--admin-token-file {path}: {what}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// What a request's `Authorization` header amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The right token.
    Allowed,
    /// No bearer token at all (401).
    Missing,
    /// A token, but not the right one (403).
    Wrong,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, b).as_ref());
    out
}

impl AdminToken {
    /// A token from its text (surrounding whitespace, such as a final newline, is ignored).
    pub fn new(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!("the token must be at least {MIN_TOKEN_LEN} characters (got {})", t.len()));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces (it travels in an HTTP header)".into());
        }
        Ok(AdminToken { digest: sha256(t.as_bytes()) })
    }

    /// Reads the token file.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| TokenError::Read { path: shown.clone(), source })?;
        if meta.len() > MAX_TOKEN_FILE {
            return Err(TokenError::Bad { path: shown, what: format!("file is over {MAX_TOKEN_FILE} bytes") });
        }
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: shown.clone(), source })?;
        Self::new(&text).map_err(|what| TokenError::Bad { path: shown, what })
    }

    /// Whether `presented` is the token (constant time over the digests).
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.digest.ct_eq(&sha256(presented)))
    }

    /// Checks `Authorization: Bearer <token>`.
    pub fn check(&self, headers: &HeaderMap) -> Check {
        let Some(value) = headers.get(AUTHORIZATION) else { return Check::Missing };
        let v = value.as_bytes();
        let Some(scheme_end) = v.iter().position(|b| *b == b' ') else { return Check::Missing };
        if !v[..scheme_end].eq_ignore_ascii_case(b"bearer") {
            return Check::Missing;
        }
        let token = v[scheme_end..].trim_ascii();
        if token.is_empty() {
            return Check::Missing;
        }
        if self.matches(token) {
            Check::Allowed
        } else {
            Check::Wrong
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    const TOKEN: &str = "s3cret-admin-token-0123";

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn bearer_checks() {
        let t = AdminToken::new(&format!("  {TOKEN}\n")).unwrap();
        assert_eq!(t.check(&headers(None)), Check::Missing);
        assert_eq!(t.check(&headers(Some(&format!("Basic {TOKEN}")))), Check::Missing);
        assert_eq!(t.check(&headers(Some("Bearer "))), Check::Missing);
        assert_eq!(t.check(&headers(Some(TOKEN))), Check::Missing);
        assert_eq!(t.check(&headers(Some("Bearer wrong-token-wrong-token"))), Check::Wrong);
        assert_eq!(t.check(&headers(Some(&format!("Bearer {TOKEN}x")))), Check::Wrong);
        assert_eq!(t.check(&headers(Some(&format!("Bearer {}", &TOKEN[1..])))), Check::Wrong);
        assert_eq!(t.check(&headers(Some(&format!("Bearer {TOKEN}")))), Check::Allowed);
        assert_eq!(t.check(&headers(Some(&format!("bearer  {TOKEN}")))), Check::Allowed);
    }

    #[test]
    fn weak_or_odd_tokens_are_refused() {
        assert!(AdminToken::new("short").unwrap_err().contains("at least"));
        assert!(AdminToken::new("\n\n").is_err());
        assert!(AdminToken::new("has a space in it, long enough").unwrap_err().contains("ASCII"));
        assert!(format!("{:?}", AdminToken::new(TOKEN).unwrap()).contains("redacted"));
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        assert!(AdminToken::from_file(&p).unwrap_err().to_string().contains("cannot read"));
        std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
        assert!(AdminToken::from_file(&p).unwrap().matches(TOKEN.as_bytes()));
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert!(AdminToken::from_file(&p).unwrap_err().to_string().contains("over"));
    }
}
