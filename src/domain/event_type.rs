//! Event types, the catalog the operator configures, and a webhook's subscription.

use std::collections::BTreeSet;
use std::fmt;

/// Reserved for `POST /webhooks/:id/test`; never published, never subscribed to.
pub const TEST_EVENT_TYPE: &str = "webhook.test";

/// The default catalog: the order lifecycle of Vignetim's API.
pub const DEFAULT_EVENT_TYPES: &[&str] = &[
    "order.created",
    "order.completed",
    "order.failed",
    "order.cancelled",
    "order.refunded",
];

/// A syntactically valid event type name: dot-separated lowercase segments
/// (`order.completed`), at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventType(String);

impl EventType {
    pub fn parse(name: &str) -> Result<Self, String> {
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if name.len() <= 64 && name.contains('.') && name.split('.').all(segment_ok) {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "{name:?} is not an event type name (lowercase dot-separated words, e.g. \"order.completed\")"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The event types this deployment publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog(BTreeSet<EventType>);

impl Catalog {
    /// Builds the catalog from names; `webhook.test` is reserved and refused.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut set = BTreeSet::new();
        for name in names {
            let event_type = EventType::parse(name.trim())?;
            if event_type.as_str() == TEST_EVENT_TYPE {
                return Err(format!("{TEST_EVENT_TYPE} is reserved for test deliveries"));
            }
            set.insert(event_type);
        }
        if set.is_empty() {
            return Err("the event type catalog is empty".to_owned());
        }
        Ok(Self(set))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|t| t.as_str() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &EventType> {
        self.0.iter()
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self(
            DEFAULT_EVENT_TYPES
                .iter()
                .map(|n| EventType((*n).to_owned()))
                .collect(),
        )
    }
}

/// What a webhook is subscribed to: everything (`["*"]`) or a set of catalog types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    All,
    Types(Vec<EventType>),
}

impl Subscription {
    /// Parses the `events` field: non-empty; either exactly `["*"]` or known types.
    /// Duplicates are dropped, the first spelling's order kept. On error returns the
    /// API error code and message.
    pub fn parse(events: &[String], catalog: &Catalog) -> Result<Self, (&'static str, String)> {
        if events.is_empty() {
            return Err((
                "invalid_events",
                "events must list at least one event type, or be [\"*\"] for all".to_owned(),
            ));
        }
        if events.iter().any(|e| e == "*") {
            return if events.iter().all(|e| e == "*") {
                Ok(Subscription::All)
            } else {
                Err((
                    "invalid_events",
                    "\"*\" subscribes to all events and cannot be combined with other types"
                        .to_owned(),
                ))
            };
        }
        let mut types: Vec<EventType> = Vec::with_capacity(events.len());
        for name in events {
            if !catalog.contains(name) {
                let known: Vec<&str> = catalog.iter().map(EventType::as_str).collect();
                return Err((
                    "unknown_event_type",
                    format!(
                        "unknown event type {name:?}; known types: {}",
                        known.join(", ")
                    ),
                ));
            }
            if !types.iter().any(|t| t.as_str() == name) {
                types.push(EventType(name.clone()));
            }
        }
        Ok(Subscription::Types(types))
    }

    /// As the API shows it and the store keeps it.
    pub fn to_names(&self) -> Vec<String> {
        match self {
            Subscription::All => vec!["*".to_owned()],
            Subscription::Types(types) => types.iter().map(|t| t.0.clone()).collect(),
        }
    }

    /// Rebuilds a stored subscription (already validated when written).
    pub fn from_stored(names: Vec<String>) -> Self {
        if names.iter().any(|n| n == "*") {
            Subscription::All
        } else {
            Subscription::Types(names.into_iter().map(EventType).collect())
        }
    }

    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            Subscription::All => true,
            Subscription::Types(types) => types.iter().any(|t| t.as_str() == event_type),
        }
    }
}

/// Checks a caller-given event id: `[A-Za-z0-9_-]{1,64}` (it is signed as
/// `{id}.{timestamp}.{body}`, so no dots).
pub fn parse_event_id(id: &str) -> Result<String, String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(id.to_owned())
    } else {
        Err("id must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -".to_owned())
    }
}

/// The delivered body: `{"id","type","createdAt","data"}`, with `data` copied byte for
/// byte from what the publisher sent. Built once; every attempt sends and signs these
/// bytes.
pub fn event_payload(
    id: &str,
    event_type: &str,
    created_at: super::time::EpochMillis,
    data: &serde_json::value::RawValue,
) -> Vec<u8> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Payload<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        event_type: &'a str,
        created_at: String,
        data: &'a serde_json::value::RawValue,
    }
    // Serialising strings and an already-valid raw value cannot fail.
    serde_json::to_vec(&Payload {
        id,
        event_type,
        created_at: super::time::format_rfc3339_millis(created_at),
        data,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_subscriptions() {
        let catalog = Catalog::default();
        assert_eq!(
            Subscription::parse(&names(&["*"]), &catalog),
            Ok(Subscription::All)
        );
        let sub = Subscription::parse(
            &names(&["order.completed", "order.failed", "order.completed"]),
            &catalog,
        )
        .expect("valid");
        assert_eq!(sub.to_names(), names(&["order.completed", "order.failed"]));
        assert!(sub.matches("order.failed"));
        assert!(!sub.matches("order.created"));
        assert_eq!(
            Subscription::parse(&[], &catalog).map_err(|e| e.0),
            Err("invalid_events")
        );
        assert_eq!(
            Subscription::parse(&names(&["*", "order.failed"]), &catalog).map_err(|e| e.0),
            Err("invalid_events")
        );
        assert_eq!(
            Subscription::parse(&names(&["order.shipped"]), &catalog).map_err(|e| e.0),
            Err("unknown_event_type")
        );
        assert_eq!(
            Subscription::parse(&names(&["webhook.test"]), &catalog).map_err(|e| e.0),
            Err("unknown_event_type")
        );
    }

    #[test]
    fn event_ids_and_payloads() {
        assert!(parse_event_id("order_123-A").is_ok());
        for bad in ["", "a.b", "a b", "é", &"x".repeat(65)] {
            assert!(parse_event_id(bad).is_err(), "{bad:?}");
        }
        let data = serde_json::value::RawValue::from_string(r#"{"z":1, "a":[2]}"#.to_owned())
            .expect("raw");
        let payload = event_payload("evt-1", "order.completed", 1_774_017_000_000, &data);
        assert_eq!(
            String::from_utf8(payload).expect("utf8"),
            r#"{"id":"evt-1","type":"order.completed","createdAt":"2026-03-20T14:30:00.000Z","data":{"z":1, "a":[2]}}"#
        );
    }

    #[test]
    fn catalog_refuses_reserved_and_malformed_names() {
        assert!(Catalog::new(["order.completed", "webhook.test"]).is_err());
        assert!(Catalog::new(["Order.Completed"]).is_err());
        assert!(Catalog::new(["order"]).is_err());
        assert!(Catalog::new(["order..x"]).is_err());
        assert!(Catalog::new(["order.completed", " order.failed "]).is_ok());
    }
}
