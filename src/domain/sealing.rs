//! Secrets at rest: signing secrets are sealed with XChaCha20-Poly1305 before the store
//! sees them.
//!
//! Sealed layout: `0x01` (format version) || 24-byte random nonce || ciphertext+tag. The
//! associated data is the owning webhook's id, so a sealed secret copied onto another
//! row does not open.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// The 32-byte key that seals secrets. `Debug` never shows it.
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    pub fn generate() -> Self {
        Self(super::random_bytes::<32>())
    }

    /// Parses 64 hex digits (what `generate` writes to the key file), or standard base64
    /// of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let text = text.trim();
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(text, &mut bytes).is_ok() {
            return Ok(Self(bytes));
        }
        match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(decoded) if decoded.len() == 32 => {
                bytes.copy_from_slice(&decoded);
                Ok(Self(bytes))
            }
            _ => Err(
                "the encryption key must be 32 bytes, written as 64 hex digits or base64"
                    .to_owned(),
            ),
        }
    }

    /// The key file's content.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// Seals `plaintext`, bound to `context` (the owning row's id).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Vec<u8> {
        let nonce = super::random_bytes::<NONCE_LEN>();
        let payload = Payload {
            msg: plaintext,
            aad: context.as_bytes(),
        };
        let ciphertext = match self.cipher().encrypt(XNonce::from_slice(&nonce), payload) {
            Ok(c) => c,
            Err(_) => unreachable!("XChaCha20-Poly1305 encryption of a short secret cannot fail"),
        };
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Opens what [`seal`](Self::seal) made with the same key and context.
    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != VERSION {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| OpenError)
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(redacted)")
    }
}

/// A sealed secret did not open: wrong key, wrong row, or damaged data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a sealed secret could not be opened (wrong encryption key or damaged data)")]
pub struct OpenError;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_hides_the_plaintext() {
        let key = EncryptionKey::generate();
        let secret = [0x42u8; 32];
        let sealed = key.seal(&secret, "wh-1");
        assert!(!sealed.windows(8).any(|w| w == &secret[..8]));
        assert_eq!(key.open(&sealed, "wh-1").expect("opens"), secret);
        // Fresh nonce every time.
        assert_ne!(key.seal(&secret, "wh-1"), sealed);
    }

    #[test]
    fn open_fails_with_wrong_key_context_or_damage() {
        let key = EncryptionKey::generate();
        let sealed = key.seal(b"secret", "wh-1");
        assert_eq!(key.open(&sealed, "wh-2"), Err(OpenError));
        assert_eq!(
            EncryptionKey::generate().open(&sealed, "wh-1"),
            Err(OpenError)
        );
        let mut damaged = sealed.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert_eq!(key.open(&damaged, "wh-1"), Err(OpenError));
        assert_eq!(key.open(&sealed[..10], "wh-1"), Err(OpenError));
    }

    #[test]
    fn parses_hex_and_base64_keys() {
        let key = EncryptionKey::generate();
        let again = EncryptionKey::parse(&key.to_hex()).expect("hex");
        assert_eq!(again.0, key.0);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.0);
        assert_eq!(EncryptionKey::parse(&b64).expect("b64").0, key.0);
        assert!(EncryptionKey::parse("abcd").is_err());
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }
}
