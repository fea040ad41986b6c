"""The HTTP API for analysts (synthetic rows) and compliance officers (budgets, audit)."""
