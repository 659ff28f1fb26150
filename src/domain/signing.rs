//! Standard Webhooks signing (v1, HMAC-SHA256).
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}` over the exact body
//! bytes sent; the key is the 32 bytes a `whs_` secret's hex encodes. Official Standard
//! Webhooks libraries take the same key as `whsec_` + base64 of those bytes
//! ([`SigningSecret::to_standard_webhooks`]).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const SECRET_PREFIX: &str = "whs_";

/// A webhook's signing secret: 32 random bytes. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret([u8; 32]);

impl SigningSecret {
    /// A new secret from the OS CSPRNG.
    pub fn generate() -> Self {
        Self(super::random_bytes::<32>())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses `whs_` + 64 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let hex_part = text.strip_prefix(SECRET_PREFIX)?;
        if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `whs_…`: the form shown to the owner, once.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", hex::encode(self.0))
    }

    /// `whsec_…`: the same key in the form the official Standard Webhooks libraries take.
    pub fn to_standard_webhooks(&self) -> String {
        format!("whsec_{}", BASE64.encode(self.0))
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(redacted)")
    }
}

/// One `v1,<base64>` signature entry.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut entry = String::with_capacity(ENTRY_LEN);
    push_entry(&mut entry, key, msg_id, &timestamp.to_string(), body);
    entry
}

/// `v1,` and 44 characters of base64.
const ENTRY_LEN: usize = 3 + 44;

/// Appends one `v1,<base64>` entry to `out`.
fn push_entry(out: &mut String, key: &[u8], msg_id: &str, timestamp: &str, body: &[u8]) {
    out.push_str("v1,");
    BASE64.encode_string(mac(key, msg_id, timestamp, body), out);
}

/// The HMAC-SHA256 of `{msg_id}.{timestamp}.{body}`.
fn mac(key: &[u8], msg_id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The `webhook-signature` header value: one `v1,` entry per secret (two during a
/// rotation), joined by exactly one space and nothing else, because receivers' libraries
/// fail on stray tokens. Written into one string (an entry, its base64 and the join each
/// allocated apart were about 1 % of the service at the benchmark's peak).
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a SigningSecret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let timestamp = timestamp.to_string();
    let mut header = String::with_capacity(2 * ENTRY_LEN + 1);
    for secret in secrets {
        if !header.is_empty() {
            header.push(' ');
        }
        push_entry(&mut header, secret.as_bytes(), msg_id, &timestamp, body);
    }
    header
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp {0:?} is not a whole number of seconds")]
    BadTimestamp(String),
    #[error(
        "webhook-timestamp is {0} s in the past, beyond the {1} s tolerance (replayed or stale)"
    )]
    TooOld(i64, i64),
    #[error("webhook-timestamp is {0} s in the future, beyond the {1} s tolerance")]
    TooNew(i64, i64),
    #[error("webhook-signature holds no v1 signature")]
    NoV1Signature,
    #[error("no v1 signature matches this secret, id, timestamp and body")]
    NoMatch,
}

/// Verifies as a receiver would: timestamp within `tolerance_s` of `now_s`, then any
/// `v1,` entry of the header matches (compared in constant time). Unknown entries are
/// skipped, as the Standard Webhooks libraries do.
pub fn verify(
    key: &[u8],
    msg_id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    use subtle::ConstantTimeEq;
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp(timestamp.to_owned()))?;
    if now_s - ts > tolerance_s {
        return Err(VerifyError::TooOld(now_s - ts, tolerance_s));
    }
    if ts - now_s > tolerance_s {
        return Err(VerifyError::TooNew(ts - now_s, tolerance_s));
    }
    let expected = mac(key, msg_id, &ts.to_string(), body);
    let mut saw_v1 = false;
    for entry in signature_header.split_whitespace() {
        let Some(b64) = entry.strip_prefix("v1,") else {
            continue;
        };
        saw_v1 = true;
        if let Ok(given) = BASE64.decode(b64)
            && given.len() == expected.len()
            && bool::from(given.ct_eq(&expected))
        {
            return Ok(());
        }
    }
    Err(if saw_v1 {
        VerifyError::NoMatch
    } else {
        VerifyError::NoV1Signature
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard Webhooks test vectors (shared/fixtures/standard-webhooks-vectors.md):
    /// (whsec secret, msg id, timestamp, body, expected header).
    const VECTORS: &[(&str, &str, i64, &str, &str)] = &[
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
        (
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
            1674087231,
            r#"{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81eb52-5198-4599-803e-771906343485"}}"#,
            "v1,4PMU5Dl90B4kgwxDpwuMZ/cnZ5ztf+Y+kviYQD66rJg=",
        ),
        (
            "whsec_paWlpaWlpaWlpaWlpaWlpaWlpaWlpaWl",
            "evt_01HZZZ",
            1700000000,
            "{\"type\":\"user.created\",\"data\":{\"name\":\"Zo\u{eb} \u{2713}\"}}",
            "v1,ZVHMGNW9GIe/vX9KI8XfwZ9C8b29YFAvDCHN1ASs640=",
        ),
        (
            "whsec_nuoSmj6pkz5b7At6Q6JDKQhtGGI/YAJL4+yTeoNMSI/Ao+hVNpIigxgC5QbrUZiA4Tv+vE9SIWwG62WYwlXaGg==",
            "msg_empty",
            0,
            "",
            "v1,wZkIfeUcv6MwBZLdCFf6I7ab11IrdMXyotZAyVgtIdg=",
        ),
    ];

    fn key(whsec: &str) -> Vec<u8> {
        BASE64
            .decode(whsec.trim_start_matches("whsec_"))
            .expect("base64")
    }

    #[test]
    fn matches_the_standard_webhooks_vectors() {
        for (secret, id, ts, body, expected) in VECTORS {
            assert_eq!(
                &sign(&key(secret), id, *ts, body.as_bytes()),
                expected,
                "{id}"
            );
            assert_eq!(
                verify(
                    &key(secret),
                    id,
                    &ts.to_string(),
                    expected,
                    body.as_bytes(),
                    *ts + 10,
                    300
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn rotation_header_matches_tv6_and_verifies_with_either_secret() {
        let old = VECTORS[0].0;
        let (new, id, ts, body, _) = VECTORS[2];
        let (old_key, new_key) = (key(old), key(new));
        // TV1's key is 24 bytes, so it cannot be a SigningSecret: build TV6 from `sign`.
        let header = format!(
            "{} {}",
            sign(&old_key, id, ts, body.as_bytes()),
            sign(&new_key, id, ts, body.as_bytes())
        );
        assert_eq!(
            header,
            "v1,ARw42xaAApl/nxRo+iPGYwSaMQaOwMo2eyH5JBRA+bQ= v1,4PMU5Dl90B4kgwxDpwuMZ/cnZ5ztf+Y+kviYQD66rJg="
        );
        for k in [&old_key, &new_key] {
            assert_eq!(
                verify(k, id, &ts.to_string(), &header, body.as_bytes(), ts, 300),
                Ok(())
            );
        }
        let new_secret = SigningSecret::from_bytes(new_key.try_into().expect("32 bytes"));
        let other = SigningSecret::from_bytes([7; 32]);
        let joined = signature_header([&other, &new_secret], id, ts, body.as_bytes());
        let entries: Vec<&str> = joined.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1],
            "v1,4PMU5Dl90B4kgwxDpwuMZ/cnZ5ztf+Y+kviYQD66rJg="
        );
    }

    #[test]
    fn verify_refuses_what_receivers_refuse() {
        let (secret, id, ts, body, sig) = VECTORS[0];
        let k = key(secret);
        let ts_s = ts.to_string();
        let with_body =
            |b: &str, h: &str, now: i64| verify(&k, id, &ts_s, h, b.as_bytes(), now, 300);
        assert_eq!(with_body(body, sig, ts + 300), Ok(()));
        assert_eq!(with_body(body, sig, ts - 300), Ok(()));
        assert!(matches!(
            with_body(body, sig, ts + 301),
            Err(VerifyError::TooOld(..))
        ));
        assert!(matches!(
            with_body(body, sig, ts - 301),
            Err(VerifyError::TooNew(..))
        ));
        assert_eq!(
            with_body(&format!("{body}\n"), sig, ts),
            Err(VerifyError::NoMatch)
        );
        let v2 = sig.replace("v1,", "v2,");
        assert_eq!(with_body(body, &v2, ts), Err(VerifyError::NoV1Signature));
        assert_eq!(with_body(body, &format!("v1,AAAA {sig}"), ts), Ok(()));
    }

    #[test]
    fn secret_formats() {
        let secret = SigningSecret::generate();
        let shown = secret.expose();
        assert!(shown.starts_with("whs_"));
        assert_eq!(shown.len(), 4 + 64);
        assert!(
            shown[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(SigningSecret::parse(&shown), Some(secret.clone()));
        assert_eq!(SigningSecret::parse(&shown.to_uppercase()), None);
        let whsec = secret.to_standard_webhooks();
        assert_eq!(key(&whsec), secret.as_bytes().to_vec());
        assert!(!format!("{secret:?}").contains(&shown[4..]));
    }
}
