"""The abuse guard: lockouts, budgets, rates, and hill-climbing detection."""
