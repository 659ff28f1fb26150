//! Typed identifiers. Each displays with its prefix (`wh-…`, `org-…`) and is parsed at
//! the edge of the API, so handlers and the store never see an unchecked id string.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// The error for an id string that is not of its type's shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind} id")]
pub struct InvalidId {
    /// Which kind of id was expected, e.g. "webhook".
    pub kind: &'static str,
}

/// Room for the longest prefix and a hyphenated UUID.
const ID_BUF: usize = 8 + uuid::fmt::Hyphenated::LENGTH;

/// `prefix` and the lowercase hyphenated `uuid`, written into `buf`.
fn encode<'b>(prefix: &str, uuid: &Uuid, buf: &'b mut [u8; ID_BUF]) -> &'b str {
    let (head, tail) = buf.split_at_mut(prefix.len());
    head.copy_from_slice(prefix.as_bytes());
    let len = prefix.len() + uuid.hyphenated().encode_lower(tail).len();
    std::str::from_utf8(&buf[..len]).unwrap_or_default()
}

macro_rules! prefixed_uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal, $make:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        const _: () = assert!($prefix.len() <= ID_BUF - uuid::fmt::Hyphenated::LENGTH);

        impl $name {
            /// The prefix this id displays with.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id.
            pub fn new() -> Self {
                Self($make)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            /// One `write_str` of the whole id, formatted on the stack: `to_string` then
            /// allocates once (the prefix and the UUID written apart made it grow its
            /// string twice, a percent of the service at the benchmark's peak).
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; ID_BUF];
                f.write_str(encode($prefix, &self.0, &mut buf))
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            /// Accepts exactly the canonical form: prefix + lowercase hyphenated UUID.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = InvalidId { kind: $kind };
                let rest = s.strip_prefix($prefix).ok_or(err.clone())?;
                let uuid = Uuid::try_parse(rest).map_err(|_| err.clone())?;
                let mut buf = [0u8; ID_BUF];
                if encode("", &uuid, &mut buf) != rest {
                    return Err(err);
                }
                Ok(Self(uuid))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// A random (v4) UUID from the OS generator.
fn random_uuid() -> Uuid {
    uuid::Builder::from_random_bytes(super::random_bytes::<16>()).into_uuid()
}

/// A time-ordered (v7) UUID: the millisecond time first, then a counter, then random
/// bits. Rows keyed by it are inserted at the right edge of their indexes instead of on
/// random pages, which cut the pages each commit writes (BENCHMARKS.md); and ids made by
/// this process increase strictly, so things created in the same millisecond (several
/// publishes, at today's speed) still sort in the order they were made (RFC 9562 §6.2,
/// method 1: a 12-bit counter in `rand_a`, starting at a random value below 2,048 each
/// millisecond; a millisecond that runs out of counter borrows the next).
fn time_ordered_uuid() -> Uuid {
    static LAST: std::sync::Mutex<(u64, u16)> = std::sync::Mutex::new((0, 0));
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let mut bytes = super::buffered_random_bytes::<10>();
    let (millis, counter) = {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = if now > last.0 {
            (now, u16::from_be_bytes([bytes[0], bytes[1]]) & 0x07FF)
        } else if last.1 < 0x0FFF {
            (last.0, last.1 + 1)
        } else {
            (last.0 + 1, 0)
        };
        *last = next;
        next
    };
    bytes[..2].copy_from_slice(&counter.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid()
}

prefixed_uuid_id!(
    /// A customer's webhook endpoint: `wh-` + lowercase UUID v4.
    WebhookId, "wh-", "webhook", random_uuid()
);
prefixed_uuid_id!(
    /// An organization (a Vignetim business customer): `org-` + UUID v4.
    OrganizationId, "org-", "organization", random_uuid()
);
prefixed_uuid_id!(
    /// An API key's public id (the key itself is secret): `key-` + UUID v4.
    ApiKeyId, "key-", "API key", random_uuid()
);
prefixed_uuid_id!(
    /// One delivery of one event to one webhook: `dlv-` + UUID v7 (time-ordered).
    DeliveryId, "dlv-", "delivery", time_ordered_uuid()
);
prefixed_uuid_id!(
    /// An event generated by the platform: `evt-` + UUID v7 (time-ordered).
    EventId, "evt-", "event", time_ordered_uuid()
);

/// The id of one API request, echoed in `X-Request-Id` and in error bodies.
pub fn new_request_id() -> String {
    let uuid = uuid::Builder::from_random_bytes(super::buffered_random_bytes::<16>()).into_uuid();
    format!("req_{}", uuid.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_id_round_trips_and_is_v4() {
        let id = WebhookId::new();
        let s = id.to_string();
        assert!(s.starts_with("wh-"));
        assert_eq!(s.len(), 3 + 36);
        assert_eq!(&s[3 + 14..3 + 15], "4", "version nibble");
        assert_eq!(s.parse::<WebhookId>(), Ok(id));
    }

    #[test]
    fn delivery_ids_are_time_ordered() {
        let first = DeliveryId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = DeliveryId::new();
        assert!(first.to_string() < second.to_string());
        assert_eq!(&second.to_string()[4 + 14..4 + 15], "7", "version nibble");
    }

    #[test]
    fn ids_made_in_the_same_millisecond_still_increase() {
        // 10,000 ids take a few milliseconds: many share one, and some millisecond's
        // counter may run out and borrow the next.
        let ids: Vec<String> = (0..10_000).map(|_| DeliveryId::new().to_string()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
        let variant = &ids[0][4 + 19..4 + 20];
        assert!(["8", "9", "a", "b"].contains(&variant), "variant {variant}");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "wh-",
            "a1b2c3d4-e5f6-7890-abcd-ef1234567890",
            "org-a1b2c3d4-e5f6-7890-abcd-ef1234567890",
            "wh-A1B2C3D4-E5F6-7890-ABCD-EF1234567890",
            "wh-a1b2c3d4e5f67890abcdef1234567890",
            "wh-a1b2c3d4-e5f6-7890-abcd-ef1234567890 ",
            "wh-{a1b2c3d4-e5f6-7890-abcd-ef1234567890}",
        ] {
            assert!(bad.parse::<WebhookId>().is_err(), "{bad:?}");
        }
        assert!(
            "wh-a1b2c3d4-e5f6-7890-abcd-ef1234567890"
                .parse::<WebhookId>()
                .is_ok()
        );
    }
}
