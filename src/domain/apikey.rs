//! API keys and environments.
//!
//! A key is `vgn_live_` or `vgn_test_` followed by 48 lowercase hex digits (24 random
//! bytes). Only its SHA-256 is stored: keys carry enough entropy that a fast hash is
//! safe, and it lets the store look a key up by its hash in one indexed read.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Live and sandbox are separate worlds: their own webhooks, events and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Sandbox,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Sandbox => "sandbox",
        }
    }

    fn key_prefix(self) -> &'static str {
        match self {
            Environment::Live => "vgn_live_",
            Environment::Sandbox => "vgn_test_",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "live" => Ok(Environment::Live),
            "sandbox" => Ok(Environment::Sandbox),
            other => Err(format!(
                "unknown environment {other:?}; expected \"live\" or \"sandbox\""
            )),
        }
    }
}

const KEY_HEX_LEN: usize = 48;

/// A plaintext API key. It exists only between generation and the response that shows
/// it once, and between a request's header and the hash lookup. `Debug` never shows it.
pub struct ApiKey {
    text: String,
    environment: Environment,
}

impl ApiKey {
    /// A new random key for `environment`.
    pub fn generate(environment: Environment) -> Self {
        let bytes = super::random_bytes::<24>();
        Self {
            text: format!("{}{}", environment.key_prefix(), hex::encode(bytes)),
            environment,
        }
    }

    /// Checks a presented key's shape (no store look-up). A key of the wrong shape is
    /// refused without touching the database.
    pub fn parse(text: &str) -> Option<Self> {
        let (environment, rest) = if let Some(rest) = text.strip_prefix("vgn_live_") {
            (Environment::Live, rest)
        } else if let Some(rest) = text.strip_prefix("vgn_test_") {
            (Environment::Sandbox, rest)
        } else {
            return None;
        };
        let well_formed = rest.len() == KEY_HEX_LEN
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        well_formed.then(|| Self {
            text: text.to_owned(),
            environment,
        })
    }

    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The one place the plaintext is read: to show it once on creation.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// What the store keeps and looks keys up by.
    pub fn hash(&self) -> Vec<u8> {
        Sha256::digest(self.text.as_bytes()).to_vec()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}, redacted)", self.environment)
    }
}

/// Compares two secrets (admin tokens) in constant time, whatever their lengths: both
/// are hashed first, so neither content nor length leaks through timing.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.ct_eq(&hb).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_with_their_environment() {
        for env in [Environment::Live, Environment::Sandbox] {
            let key = ApiKey::generate(env);
            let parsed = ApiKey::parse(key.expose()).expect("well-formed");
            assert_eq!(parsed.environment(), env);
            assert_eq!(parsed.hash(), key.hash());
        }
        assert!(
            ApiKey::generate(Environment::Sandbox)
                .expose()
                .starts_with("vgn_test_")
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = ApiKey::generate(Environment::Live).expose().to_owned();
        for bad in [
            "",
            "vgn_live_",
            "vgn_prod_0123",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.to_uppercase(),
            &good.replace("vgn_live_", "vgn_live-"),
        ] {
            assert!(ApiKey::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::generate(Environment::Live);
        assert!(!format!("{key:?}").contains(&key.expose()[9..]));
    }

    #[test]
    fn constant_time_eq_compares_content() {
        assert!(constant_time_eq("token", "token"));
        assert!(!constant_time_eq("token", "token2"));
        assert!(!constant_time_eq("token", "tokex"));
    }
}
