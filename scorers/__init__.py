"""Reference-model scoring and difficulty signals for stepwise DPO."""
