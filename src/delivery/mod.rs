//! Delivery: everything that sends a webhook request.
//!
//! What it owns: the guarded HTTP client (the only outbound HTTP in the service), the
//! classification of an attempt's outcome, and the test call. What it must not do: hold
//! a database transaction across an HTTP call, or send anywhere the URL policy forbids.

pub mod client;
mod endpoints;
pub mod secrets;
pub mod test_call;
pub mod worker;

pub use client::{Dispatch, FailureClass, GuardedClient, Outcome, Resolver, SystemResolver};
