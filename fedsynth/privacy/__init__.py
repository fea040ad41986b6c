"""Privacy: budgets and ledgers, secure-aggregation settings, keys and encryption at rest."""
