"""Multilingual medical dialogue (MedAidLM): knowledge base, MDDial-style generator, readers and metrics."""
