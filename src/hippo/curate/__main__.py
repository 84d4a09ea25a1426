"""Entrypoint: ``python -m hippo.curate data.root=DIR`` — scan and check a Decathlon-style data set.

Composes ``conf/curate.yaml`` and calls :func:`hippo.curate.curation.curate`; the run directory
(``outputs/curate/<time>/`` unless ``hydra.run.dir=...``) receives ``report.md``, ``curation.json``,
the PNG plots and ``manifest.json`` (train on the clean cases with ``data.manifest=.../manifest.json``).
A missing or empty data directory, or a data set without a single usable case, ends with a
one-line ``error: ...`` and a non-zero exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="curate")
def main(cfg: DictConfig) -> None:
    from hippo.curate.curation import curate

    checks, outliers = cfg.checks, cfg.outliers
    spacing = checks.expected_spacing
    try:
        result = curate(
            cfg.data.root,
            cfg.out_dir,
            workers=int(cfg.workers),
            clean_copy=cfg.clean_copy or None,
            images_dir=cfg.data.images_dir,
            labels_dir=cfg.data.labels_dir,
            expected_spacing=None if spacing is None else list(OmegaConf.to_container(spacing)),
            spacing_tol=float(checks.spacing_tol),
            affine_atol=float(checks.affine_atol),
            require_both_classes=bool(checks.require_both_classes),
            volume_outlier_z=None if outliers.volume_z is None else float(outliers.volume_z),
            exclude_volume_outliers=bool(outliers.exclude_volume),
            intensity_outlier_z=None if outliers.intensity_z is None else float(outliers.intensity_z),
            exclude_intensity_outliers=bool(outliers.exclude_intensity),
            min_cases_for_outliers=int(outliers.min_cases),
            plots=bool(cfg.plots),
        )
    except (FileNotFoundError, ValueError) as exc:  # CaseError is a ValueError
        sys.exit(f"error: {exc}")

    s = result.summary
    print(f"curated {result.root}: {s['n_cases']} cases ({s['n_pairs_scanned']} pairs, {s['n_unpaired']} unpaired "
          f"files) -> {s['n_clean']} clean, {s['n_excluded']} excluded, {s['n_flagged_kept']} flagged but kept")
    if s["reason_counts"]:
        print("flags: " + ", ".join(f"{k} {v}" for k, v in s["reason_counts"].items()))
    total = s["volumes_clean_mm3"]["total_mm3"]
    if total["n"]:
        print(f"total volume (clean): {total['mean']:.0f} ± {total['sd']:.0f} mm³ "
              f"[{total['min']:.0f}, {total['max']:.0f}]")
    print(f"report:   {result.files['report']}")
    print(f"manifest: {result.files['manifest']}")
    if "clean" in result.files:
        print(f"clean copy: {result.files['clean']}")
    if not result.clean:
        sys.exit(f"error: no usable case in {result.root}; see {Path(result.files['report'])}")


if __name__ == "__main__":
    main()
