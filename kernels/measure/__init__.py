"""Measurement: perplexity with the papers' convention, and dense-versus-sparse speed."""
