"""Runnable end-to-end examples."""
