"""Food recognition under dual imbalance: class-incremental learning with merged adapters (DIME)."""
