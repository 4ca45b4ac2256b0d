"""Decoding under a posterior: BMA and per-state decoding over stacked adapter states, token and sequence
uncertainty, answer grouping (see :mod:`rayblora.generation.decode`)."""
