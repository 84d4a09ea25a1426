"""Deployment on DICOM studies: ``python -m hippo.deploy`` (:mod:`hippo.deploy.__main__`).

- :mod:`hippo.deploy.pipeline` — one study end to end (ingest → volume → infer → measure →
  report/SEG/SR → send) and a batch of studies in a process pool; also used by the listener.
- :mod:`hippo.deploy.batch` — what one ``hippo.deploy`` run does with its resolved config (outbox
  flush, one study or a folder of studies, the summary, the exit status).
- :mod:`hippo.deploy.options` — the one map from a deploy or listen config to the pipeline's
  options (the batch and the listener both use it).

No Lightning or Hydra below the entrypoint: a deploy server loads the model file with torch alone.
"""
