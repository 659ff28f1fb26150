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

/// Bytes from the operating system's CSPRNG, fetched 256 at a time per thread: for ids
/// and jitter, made once or more per delivery, where a system call each (as
/// [`random_bytes`] makes) was about 1.5 % of the service's CPU. Secrets, keys and nonces
/// use [`random_bytes`].
pub fn buffered_random_bytes<const N: usize>() -> [u8; N] {
    const POOL: usize = 256;
    thread_local! {
        static BUFFER: std::cell::RefCell<([u8; POOL], usize)> =
            const { std::cell::RefCell::new(([0; POOL], POOL)) };
    }
    if N > POOL {
        return random_bytes::<N>();
    }
    BUFFER.with_borrow_mut(|(pool, used)| {
        if POOL - *used < N {
            #[expect(
                clippy::expect_used,
                reason = "no safe fallback when the OS CSPRNG fails"
            )]
            getrandom::fill(pool).expect("the operating system's random generator failed");
            *used = 0;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&pool[*used..*used + N]);
        // Each byte is handed out once.
        pool[*used..*used + N].fill(0);
        *used += N;
        out
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn buffered_random_bytes_never_repeat_across_refills() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(super::buffered_random_bytes::<16>()));
        }
        assert_ne!(super::buffered_random_bytes::<8>(), [0; 8]);
    }
}
