"""Curation of a Decathlon-style hippocampus data set: ``python -m hippo.curate`` (:mod:`hippo.curate.__main__`).

- :mod:`hippo.curate.curation` — scan every pair, check it, find outliers, write the report,
  the plots, ``curation.json`` and the clean ``manifest.json`` (and optionally a clean copy).
"""
