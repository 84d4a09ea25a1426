"""Evaluation of an exported model file: ``python -m hippo.eval`` (:mod:`hippo.eval.__main__`).

- :mod:`hippo.eval.evaluate` — 3D per-volume Dice/Jaccard of a model file on labelled pairs, using
  only the deploy-side inference (:class:`hippo.infer.InferenceAgent`).
"""
