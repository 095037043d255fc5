"""The server-side process (arrives with the split-learning issue)."""
