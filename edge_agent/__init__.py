"""The hospital-side process (arrives with the split-learning issue)."""
