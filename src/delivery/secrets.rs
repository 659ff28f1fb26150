//! Opened signing secrets, kept per webhook while its sealed bytes stay the same.
//!
//! Opening a sealed secret (XChaCha20-Poly1305) on every attempt was about 2.4 % of the
//! service's CPU at the benchmark's peak. A rotation or a new encryption key changes the
//! sealed bytes a claim reads, so an entry never outlives the secret it was opened from;
//! the previous secret's overlap is judged at each use.

use std::collections::HashMap;
use std::sync::Mutex;

use super::test_call::{OpenSecrets, open_secrets};
use crate::domain::ids::WebhookId;
use crate::domain::sealing::EncryptionKey;
use crate::domain::signing::SigningSecret;
use crate::domain::time::EpochMillis;
use crate::store::{SealedSecrets, StoreError};

/// Webhooks whose secrets are kept open at most; past it the cache starts afresh.
const MAX_WEBHOOKS: usize = 4096;

/// See the module docs.
#[derive(Default)]
pub struct SecretCache {
    open: Mutex<HashMap<WebhookId, Opened>>,
}

struct Opened {
    sealed: SealedSecrets,
    /// The previous secret only if it was still signing when opened.
    secrets: OpenSecrets,
}

impl Opened {
    fn opened_from(&self, sealed: &SealedSecrets) -> bool {
        self.sealed.current == sealed.current && self.sealed.previous == sealed.previous
    }
}

impl SecretCache {
    /// The secrets that sign `webhook`'s deliveries at `now`, opened once per sealed value.
    pub fn open(
        &self,
        key: &EncryptionKey,
        webhook: WebhookId,
        sealed: &SealedSecrets,
        now: EpochMillis,
    ) -> Result<Vec<SigningSecret>, StoreError> {
        if let Ok(open) = self.open.lock()
            && let Some(opened) = open.get(&webhook)
            && opened.opened_from(sealed)
        {
            return Ok(opened.secrets.signing_at(now));
        }
        let secrets = open_secrets(key, &webhook.to_string(), sealed, now)?;
        let signing = secrets.signing_at(now);
        if let Ok(mut open) = self.open.lock() {
            if open.len() >= MAX_WEBHOOKS {
                open.clear();
            }
            open.insert(
                webhook,
                Opened {
                    sealed: sealed.clone(),
                    secrets,
                },
            );
        }
        Ok(signing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(key: &EncryptionKey, webhook: WebhookId, secret: &SigningSecret) -> Vec<u8> {
        key.seal(secret.as_bytes(), &webhook.to_string())
    }

    #[test]
    fn follows_rotations_and_the_end_of_the_overlap() {
        let key = EncryptionKey::generate();
        let webhook = WebhookId::new();
        let (first, second) = (SigningSecret::generate(), SigningSecret::generate());
        let cache = SecretCache::default();
        let before = SealedSecrets {
            current: sealed(&key, webhook, &first),
            previous: None,
        };
        assert!(cache.open(&key, webhook, &before, 1_000).expect("opens") == vec![first.clone()]);
        // Rotated: the new secret signs, the old one beside it until the overlap ends.
        let after = SealedSecrets {
            current: sealed(&key, webhook, &second),
            previous: Some((before.current.clone(), 5_000)),
        };
        let during = cache.open(&key, webhook, &after, 2_000).expect("opens");
        assert!(during == vec![first.clone(), second.clone()]);
        assert!(cache.open(&key, webhook, &after, 5_000).expect("opens") == vec![second.clone()]);
        // A sealed value that cannot be opened is an error, not an old entry.
        let broken = SealedSecrets {
            current: vec![0; 40],
            previous: None,
        };
        assert!(cache.open(&key, webhook, &broken, 6_000).is_err());
    }
}
