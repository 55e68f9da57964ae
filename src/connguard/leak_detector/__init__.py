"""The runtime layer: a pytest plugin that provisions PostgreSQL and counts connections per test."""
