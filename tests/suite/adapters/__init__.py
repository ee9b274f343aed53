"""Tests of the shared adapter layer (suite/adapters)."""
