//! Pure domain types and rules: ids, time, the URL policy, event types, signing and
//! secret sealing.
//!
//! Architecture invariant: nothing in `domain` does I/O (no database, no network, no
//! clock reads except through values passed in), so every rule here is tested with plain
//! unit and property tests.

pub mod apikey;
pub mod event_type;
pub mod ids;
pub mod retry;
pub mod sealing;
pub mod signing;
pub mod time;
pub mod url_policy;

/// Fills `buf` from the operating system's CSPRNG.
///
/// The OS generator failing is not something a service can recover from, so this panics
/// rather than hand out predictable bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    #[expect(
        clippy::expect_used,
        reason = "no safe fallback when the OS CSPRNG fails"
    )]
    getrandom::fill(&mut buf).expect("the operating system's random generator failed");
    buf
}
