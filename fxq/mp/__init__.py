"""Mixed precision: sensitivities, budgets, the HiGHS ILP and typed allocation plans."""
