"""A small async service that reproduces the connection-pool outage connguard exists for."""
