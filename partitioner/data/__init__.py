"""Loading and validating preference data, its reject records, and tokenization exactly as DPOTrainer does."""
