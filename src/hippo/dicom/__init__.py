"""DICOM side of deployment: study ingest, series -> volume geometry, report and result objects.

Never imports torch, Lightning or Hydra: it turns files into arrays and arrays into objects.
"""
