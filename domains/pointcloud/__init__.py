"""3-D point-cloud classification: MCFT fine-tuning of a Point-MAE foundation model (see README.md)."""
