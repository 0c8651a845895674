//! Shared helpers for the spec tests (each test file may also carry its own).
