"""Privacy: budgets and ledgers, secure-aggregation settings, keys and encryption at rest,
and the membership-inference attacks that test the guarantee from outside (attacks.py)."""
