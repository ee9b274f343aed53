"""Nuclei instance segmentation and classification with SAM adapters."""
