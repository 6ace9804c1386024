"""In-memory galleries of opened templates."""
