//! Gathering work into batches: one writer job for many items is one hand-off to the
//! SQLite writer's thread and one share of a commit (a WAL write) instead of many.

use std::time::Duration;

use tokio::sync::mpsc;

/// After `first`, takes what is already queued, and keeps waiting up to `linger` for
/// more, until `max` items. A short linger under load turns many small transactions into
/// a few large ones; with no load it costs nothing when `linger` is zero.
pub async fn gather<T>(
    rx: &mut mpsc::Receiver<T>,
    first: T,
    into: &mut Vec<T>,
    max: usize,
    linger: Duration,
) {
    into.push(first);
    let deadline = tokio::time::Instant::now() + linger;
    while into.len() < max {
        match rx.try_recv() {
            Ok(item) => into.push(item),
            Err(_) if linger.is_zero() => break,
            Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => into.push(item),
                _ => break,
            },
        }
    }
}
