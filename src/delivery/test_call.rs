//! `POST /webhooks/:id/test`: one real signed delivery of a `webhook.test` event, sent
//! synchronously through the guarded client and recorded in the delivery log.
//!
//! It ignores the webhook's subscription filter and its `active` flag (the owner asked
//! for it explicitly), never changes `consecutiveFailures`, and never returns the
//! endpoint's response body to the caller (the test call must not become an SSRF probe).

use serde::Serialize;

use super::client::{Dispatch, FailureClass, GuardedClient, Outcome};
use crate::domain::event_type::TEST_EVENT_TYPE;
use crate::domain::ids::{DeliveryId, EventId};
use crate::domain::sealing::EncryptionKey;
use crate::domain::signing::{SigningSecret, signature_header};
use crate::domain::time::{EpochMillis, format_rfc3339_millis};
use crate::store::{SealedSecrets, Store, StoreError, Tenant, TestDelivery, Webhook};

/// The test call's answer, exactly as the published page shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    /// True iff the endpoint answered 2xx within the time limit.
    pub success: bool,
    /// The HTTP status, or null when no response came.
    pub status_code: Option<u16>,
    /// Whole milliseconds from sending to the verdict.
    pub response_time: u64,
    pub message: String,
}

/// A webhook's signing secrets, opened: the current one, and the previous one with the end
/// of its rotation overlap.
pub struct OpenSecrets {
    current: SigningSecret,
    previous: Option<(SigningSecret, EpochMillis)>,
}

impl OpenSecrets {
    /// The secrets that sign at `now`: the current one, and the previous one while its
    /// rotation overlap lasts. The previous one signs first.
    pub fn signing_at(&self, now: EpochMillis) -> Vec<SigningSecret> {
        let mut secrets = Vec::with_capacity(2);
        if let Some((previous, expires_at)) = &self.previous
            && *expires_at > now
        {
            secrets.push(previous.clone());
        }
        secrets.push(self.current.clone());
        secrets
    }
}

/// Opens a webhook's sealed secrets; the previous one only if it still signs at `now`.
pub fn open_secrets(
    key: &EncryptionKey,
    webhook_id: &str,
    sealed: &SealedSecrets,
    now: EpochMillis,
) -> Result<OpenSecrets, StoreError> {
    let open = |bytes: &[u8]| -> Result<SigningSecret, StoreError> {
        let plain = key
            .open(bytes, webhook_id)
            .map_err(|e| StoreError::Corrupt(format!("signing secret of {webhook_id}: {e}")))?;
        let array: [u8; 32] = plain
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("signing secret length of {webhook_id}")))?;
        Ok(SigningSecret::from_bytes(array))
    };
    let previous = match &sealed.previous {
        Some((previous, expires_at)) if *expires_at > now => Some((open(previous)?, *expires_at)),
        _ => None,
    };
    Ok(OpenSecrets {
        current: open(&sealed.current)?,
        previous,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TestPayload<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    created_at: String,
    data: TestData<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TestData<'a> {
    webhook_id: &'a str,
    message: &'a str,
}

/// Sends the test event and records it. `now` is the request's time.
pub async fn run(
    store: &dyn Store,
    client: &GuardedClient,
    key: &EncryptionKey,
    tenant: Tenant,
    webhook: &Webhook,
    sealed: &SealedSecrets,
    now: EpochMillis,
) -> Result<TestResult, StoreError> {
    let webhook_id = webhook.id.to_string();
    let secrets = open_secrets(key, &webhook_id, sealed, now)?.signing_at(now);
    let event_id = EventId::new();
    let msg_id = event_id.to_string();
    let payload = serde_json::to_vec(&TestPayload {
        id: &msg_id,
        kind: TEST_EVENT_TYPE,
        created_at: format_rfc3339_millis(now),
        data: TestData {
            webhook_id: &webhook_id,
            message: "This is a test event from Vignetim Webhooks.",
        },
    })
    .map_err(|e| StoreError::Corrupt(format!("test payload: {e}")))?;
    let timestamp = now.div_euclid(1000);
    let signature = signature_header(&secrets, &msg_id, timestamp, &payload);
    let outcome = client
        .send(Dispatch {
            url: &webhook.url,
            msg_id: &msg_id,
            timestamp,
            signature,
            body: bytes::Bytes::from(payload.clone()),
        })
        .await;
    let response_time = u64::try_from(outcome.elapsed.as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        webhook = %webhook_id,
        status = ?outcome.status,
        failure = outcome.failure.map(FailureClass::as_str),
        detail = %outcome.detail,
        response_time,
        "test delivery"
    );
    let result = TestResult {
        success: outcome.succeeded(),
        status_code: outcome.status,
        response_time,
        message: message(&outcome, client),
    };
    store
        .record_test_delivery(
            tenant,
            &TestDelivery {
                event_id,
                delivery_id: DeliveryId::new(),
                webhook_id: webhook.id,
                payload,
                created_at: now,
                succeeded: result.success,
                attempt: outcome.into_record(now),
            },
        )
        .await?;
    Ok(result)
}

fn message(outcome: &Outcome, client: &GuardedClient) -> String {
    match outcome.failure {
        None => "Test webhook delivered successfully".to_owned(),
        // The published page's exact text for every non-2xx answer.
        Some(FailureClass::HttpStatus | FailureClass::ResponseTooLarge) => {
            "Webhook endpoint returned non-2xx status code".to_owned()
        }
        Some(FailureClass::Timeout) => format!(
            "Webhook endpoint did not respond within {} seconds",
            client.timeout().as_secs_f64()
        ),
        Some(FailureClass::Dns) => "Could not resolve the webhook endpoint's host name".to_owned(),
        Some(FailureClass::Connect) => "Could not connect to the webhook endpoint".to_owned(),
        Some(FailureClass::Tls) => {
            "TLS handshake with the webhook endpoint failed (certificate not trusted or invalid)"
                .to_owned()
        }
        Some(FailureClass::BlockedAddress) => {
            "Webhook endpoint resolves to a private or reserved address; it was not contacted"
                .to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_secret_signs_only_until_it_expires() {
        let key = EncryptionKey::generate();
        let (old, new) = (SigningSecret::generate(), SigningSecret::generate());
        let sealed = SealedSecrets {
            current: key.seal(new.as_bytes(), "wh-x"),
            previous: Some((key.seal(old.as_bytes(), "wh-x"), 1_000)),
        };
        let during = open_secrets(&key, "wh-x", &sealed, 999)
            .expect("opens")
            .signing_at(999);
        assert_eq!(during, vec![old, new.clone()]);
        let after = open_secrets(&key, "wh-x", &sealed, 1_000)
            .expect("opens")
            .signing_at(1_000);
        assert_eq!(after, vec![new]);
        assert!(open_secrets(&key, "wh-y", &sealed, 0).is_err());
    }
}
