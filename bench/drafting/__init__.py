"""Lossless block drafting: measurements."""
