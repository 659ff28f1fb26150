//! Crash safety and the operator CLI against the real binary (written next).
