"""``medsplit privacy``: train each mode, attack what the aggregator received, score it.

``attacks`` holds what the aggregator does, ``sweep`` runs the jobs and scores the attacks
against the sites' real records, ``report`` writes the tables and the plot. docs/privacy.md
has the threat model and the measured results.
"""
