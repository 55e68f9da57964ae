"""Database provisioning: an existing server, a testcontainers container, or a local cluster."""
