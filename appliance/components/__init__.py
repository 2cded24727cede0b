"""Data-plane components that run as their own processes (cloud cache, on-prem I/O manager)."""
