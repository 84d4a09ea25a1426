"""Curation of a Decathlon-style hippocampus data set: ``python -m hippo.curate`` (:mod:`hippo.curate.__main__`).

- :mod:`hippo.curate.curation` — :func:`~hippo.curate.curation.curate`: every pair checked in worker
  processes, outliers, then ``curation.json``, ``manifest.json``, the plots and ``report.md``.
- :mod:`hippo.curate.records` — the reason-code flags, one record per case, the result.
- :mod:`hippo.curate.case_scan` — the checks of one image/label pair.
- :mod:`hippo.curate.outliers` — robust z-scores over the data set.
- :mod:`hippo.curate.plots`, :mod:`hippo.curate.markdown_report` — the report's figures and text.
- :mod:`hippo.curate.clean_copy` — the kept cases as a data set of their own.

The manifest is read back by :func:`hippo.data.manifest.read_manifest` (training and evaluation).
"""
