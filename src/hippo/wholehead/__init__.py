"""Whole-head T1 in: localise both hippocampi, segment each in the training-crop convention, map
the masks back onto the scan's grid.

Modules (none imports torch, Lightning or Hydra at import time; the inference agent brings torch):

* :mod:`hippo.wholehead.template` — the shipped 2 mm MNI ICBM152 2009 template, hippocampus
  centroids (Tian 2020 atlas), the eTIV constant;
* :mod:`hippo.wholehead.register` — affine registration to the template (SimpleITK);
* :mod:`hippo.wholehead.crops` — crop geometry, sampling, mirroring, mapping back;
* :mod:`hippo.wholehead.segment` — :func:`segment_wholehead`, both sides end to end;
* :mod:`hippo.wholehead.review` — plain-words review checks;
* :mod:`hippo.wholehead.page` — the report PNG;
* :mod:`hippo.wholehead.run` — ``python -m hippo.predict``: files, BIDS, batches, outputs.

For a DICOM series (:class:`hippo.dicom.volume.SeriesVolume`)::

    result = segment_wholehead(series.array, series.affine, agent, spacing=series.spacing)
    result.left.labels, result.right.labels   # (X, Y, Z) uint8 {0, 1 anterior, 2 posterior}
    result.labels                             # 1/2 left, 3/4 right on the same grid
    series.to_source(result.labels)           # back onto the DICOM frames
"""

from __future__ import annotations

from typing import Any

__all__ = ["segment_wholehead", "WholeHeadResult", "SideResult", "LABELS", "register_to_template", "Registration",
           "locator_agent"]


def __getattr__(name: str) -> Any:  # lazy: importing the package stays cheap
    if name in ("segment_wholehead", "WholeHeadResult", "SideResult", "LABELS", "locator_agent"):
        from hippo.wholehead import segment

        return getattr(segment, name)
    if name in ("register_to_template", "Registration"):
        from hippo.wholehead import register

        return getattr(register, name)
    raise AttributeError(f"module 'hippo.wholehead' has no attribute {name!r}")
