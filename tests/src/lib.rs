//! Shared helpers for the end-to-end tests: a real redis-server on a free port, services on loopback.
