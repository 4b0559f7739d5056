//! ftss: see README.md. This root package only hosts the end-to-end tests and the examples.
