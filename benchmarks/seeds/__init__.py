"""Seed-repeated evidence runs on real data (see run.py)."""
