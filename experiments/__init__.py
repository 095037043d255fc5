"""``medsplit experiment``: every mode on the same data, through a real broker, compared."""
