"""A hospital's data: DICOM folders, EHR tables, built-in datasets, partitions, caches.

Only the edge agent reads patient data, so all of it lives here; nothing in this package is
imported by the kernel or the aggregator.
"""
