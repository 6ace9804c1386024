"""Pure distance math."""
