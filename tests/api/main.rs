//! Integration tests: the real service over HTTP, real HTTPS receivers, real SQLite.

mod helpers;

mod auth;
mod crash;
mod delivery;
mod errors;
mod ops;
mod secrets;
mod store;
mod test_call;
mod webhooks;
