//! Unit tests of the RDS mapping.
