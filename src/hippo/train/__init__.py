"""Training: ``python -m hippo.train`` (:mod:`hippo.train.__main__`, the Hydra entrypoint).

- :mod:`hippo.train.fit` — one run from a composed config: fit, test on whole volumes, export the model file.
- :mod:`hippo.train.sweep_summary` — the Hydra callback that ranks the runs of a ``--multirun``.
"""
