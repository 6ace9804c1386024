"""Authentication (certificate -> Caller) and authorization (policy)."""
