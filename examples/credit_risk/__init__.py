"""A credit-risk example: a deterministic loan-table generator and the MLP that scores it."""
