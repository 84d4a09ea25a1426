"""Make a training run the shipped default model: copy its weights and split, write the model card.

    python -m hippo.models.publish RUN_DIR [--cv SWEEP_DIR] [--ablations DIR ...] [--dest DIR]

``RUN_DIR`` is a finished ``python -m hippo.train`` run (``model.pt``, ``split.json``,
``results.json``, ``val_results.json``); ``--cv`` the cross-validation multirun whose
``cv_summary.json`` (or fold ``val_results.json``) gives the CV figures; ``--ablations`` further
runs on the same fold whose test and validation figures go into the card's ablation table. Writes
``hippocampus_25d.pt``, ``hippocampus_25d.split.json`` and ``MODEL_CARD.md`` into ``--dest``
(default: this package's directory, so the next install ships them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.models import DEFAULT_MODEL_NAME
from hippo.sweep import summarize_cross_validation

CLASSES = ("anterior", "posterior")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {path}: {exc}") from None


def _fmt(summary: dict[str, Any], key: str) -> str:
    v = summary.get(key)
    return f"{v['mean']:.4f} ± {v['std']:.4f}" if v else "n/a"


def _overrides(run: Path) -> list[str]:
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    return [line[2:].strip() for line in f.read_text().splitlines() if line.startswith("- ")]


def render_card(run: Path, cv: dict[str, Any] | None, ablations: Sequence[Path]) -> str:
    """The model card (Markdown) of the run in ``run``."""
    results, val = _read(run / "results.json"), _read(run / "val_results.json")
    config, training = results["config"], results.get("training", {})
    split = _read(run / "split.json")
    s, vs = results["summary"], val["summary"]
    net = config["model"]["net"]
    lines = [
        f"# Model card: `{DEFAULT_MODEL_NAME}` (the shipped default model)",
        "",
        "Segments the anterior (label 1) and posterior (label 2) hippocampus in a T1-weighted MRI crop "
        "around one hippocampus, slice by slice along the left-right axis with the neighbouring slices as "
        "extra channels (2.5D). Research use only: not a medical device, not validated for clinical decisions.",
        "",
        "## Data",
        "- Medical Segmentation Decathlon, Task04_Hippocampus (Vanderbilt University Medical Center; "
        "licence CC-BY-SA 4.0): the labelled pairs present in the copy used "
        f"({sum(len(split[k]) for k in ('train', 'val', 'test'))} cases), 1 mm isotropic crops, "
        "each image min-max normalised on its own.",
        f"- Split by volume, seed {split['seed']}: {len(split['test'])} test cases held out from training "
        f"and model selection (listed in `{DEFAULT_MODEL_NAME}.split.json`); the other cases cut into "
        f"{split.get('num_folds')} cross-validation folds, fold {split.get('fold')} used for validation "
        f"({len(split['train'])} train / {len(split['val'])} val).",
        "",
        "## Configuration",
        f"- `python -m hippo.train {' '.join(_overrides(run)) or 'experiment=hippocampus_25d'}`",
        f"- Recursive 2D UNet, {net['initial_filters']} filters at the top, depth {net['num_downs']}, "
        f"{net['norm']} norm, {net['in_channels']} input channels "
        f"({config['data']['context_slices']} neighbouring slices per side); loss {config['model']['loss']}; "
        f"{config['model']['optimizer']['_target_'].rsplit('.', 1)[-1]} lr {config['model']['optimizer']['lr']}, "
        f"cosine schedule, {config['trainer']['max_epochs']} epochs, batch {config['data']['batch_size']}, "
        f"precision {training.get('precision', config['trainer']['precision'])}.",
        "- Augmentation: " + (", ".join(f"{k}={v}" for k, v in (config['model'].get('augmentation') or {}).items()
                                        if k != "_target_") or "none") + ".",
        f"- Post-processing: largest connected foreground component "
        f"{'kept' if config['model'].get('largest_component') else 'not applied'}.",
        "- Best checkpoint by validation Dice (2D, per epoch).",
        "",
        "## Metrics (3D Dice per volume, mean ± sd)",
        "",
        "| split | volumes | Dice anterior | Dice posterior | Dice mean | Dice foreground | Jaccard mean |",
        "|---|---|---|---|---|---|---|",
        f"| test (held out) | {s['n_volumes']['count']} | {_fmt(s, 'dice_anterior')} | {_fmt(s, 'dice_posterior')} | "
        f"{_fmt(s, 'dice_mean')} | {_fmt(s, 'dice_foreground')} | {_fmt(s, 'jaccard_mean')} |",
        f"| val (fold {val.get('fold')}) | {vs['n_volumes']['count']} | {_fmt(vs, 'dice_anterior')} | "
        f"{_fmt(vs, 'dice_posterior')} | {_fmt(vs, 'dice_mean')} | {_fmt(vs, 'dice_foreground')} | "
        f"{_fmt(vs, 'jaccard_mean')} |",
    ]
    if cv:
        p = cv["pooled"]
        lines.append(f"| {cv['n_folds']}-fold cross-validation (pooled) | {cv['n_volumes']} | "
                     f"{_fmt(p, 'dice_anterior')} | {_fmt(p, 'dice_posterior')} | {_fmt(p, 'dice_mean')} | "
                     f"{_fmt(p, 'dice_foreground')} | {_fmt(p, 'jaccard_mean')} |")
        lines += ["", "Cross-validation per fold (mean Dice over that fold's validation volumes):", "",
                  "| fold | Dice anterior | Dice posterior | Dice mean |", "|---|---|---|---|"]
        for fold, m in cv["folds"].items():
            lines.append(f"| {fold} | {m['dice_anterior']:.4f} | {m['dice_posterior']:.4f} | {m['dice_mean']:.4f} |")
    if ablations:
        lines += ["", "## Ablations (same fold, same epochs; one lever removed at a time)", "",
                  "| run | overrides | test Dice anterior | test Dice posterior | val Dice mean |",
                  "|---|---|---|---|---|"]
        for a in [run, *ablations]:
            r, v = _read(a / "results.json")["summary"], _read(a / "val_results.json")["summary"]
            extra = [o for o in _overrides(a) if not o.startswith(("data.root", "hydra.", "experiment", "data.fold"))]
            lines.append(f"| {a.name} | {' '.join(extra) or '(the shipped configuration)'} | "
                         f"{r['dice_anterior']['mean']:.4f} | {r['dice_posterior']['mean']:.4f} | "
                         f"{v['dice_mean']['mean']:.4f} |")
    lines += [
        "",
        "## Training",
        f"- {training.get('fit_seconds', 0) / 60:.1f} min of fitting on {platform.processor() or platform.machine()} "
        f"CPU ({training.get('accelerator', '?')}), {config['trainer'].get('devices', 1)} device; "
        f"{training.get('epochs', '?')} epochs run; hippo {results.get('hippo_version')}.",
        "",
        "## Reproduce",
        "```",
        "python -m hippo.train experiment=hippocampus_25d data.root=../shared/data/Task04_Hippocampus",
        "python -m hippo.train experiment=hippocampus_25d data.root=../shared/data/Task04_Hippocampus \\",
        "    'data.fold=0,1,2,3,4' --multirun            # cross-validation -> cv_summary.json",
        "python -m hippo.models.publish outputs/hippocampus_25d/runs/<run> --cv outputs/hippocampus_25d/multiruns/<sweep>",
        "python -m hippo.eval data.root=../shared/data/Task04_Hippocampus   # the shipped model on its test split",
        "```",
        "",
        "## Licence",
        "The weights are derived from the Decathlon hippocampus data (CC-BY-SA 4.0, Vanderbilt University "
        "Medical Center): credit the data set and share derived weights under the same licence.",
        "",
        "## Limits",
        "- Trained on 1 mm crops around one hippocampus (about 35 x 50 x 35 voxels); deployment expects the same "
        "kind of series (the HippoCrop series rule). Whole-brain scans need cropping first.",
        "- Adult research cohort of one site; other scanners, field strengths and ages are untested.",
        "",
    ]
    return "\n".join(lines)


def publish(run: Path, dest: Path, cv_dir: Path | None = None, ablations: Sequence[Path] = ()) -> dict[str, Path]:
    """Copy the run's model and split into ``dest`` and write the model card there."""
    model = run / "model.pt"
    if not model.is_file():
        raise SystemExit(f"error: {model}: no exported model in this run")
    cv = None
    if cv_dir is not None:
        cv = summarize_cross_validation(cv_dir)
        if cv is None:
            raise SystemExit(f"error: {cv_dir}: no fold val_results.json (run with data.fold=0,1,2,3,4 --multirun)")
    dest.mkdir(parents=True, exist_ok=True)
    out = {"model": dest / f"{DEFAULT_MODEL_NAME}.pt", "split": dest / f"{DEFAULT_MODEL_NAME}.split.json",
           "card": dest / "MODEL_CARD.md"}
    write_bytes_atomic(out["model"], model.read_bytes())
    write_json_atomic(out["split"], _read(run / "split.json"))
    write_bytes_atomic(out["card"], render_card(run, cv, ablations).encode())
    if cv is not None:
        write_json_atomic(dest / f"{DEFAULT_MODEL_NAME}.cv.json", cv)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Make a training run the shipped default model (weights, split, card).")
    p.add_argument("run", type=Path, help="a finished hippo.train run directory")
    p.add_argument("--cv", type=Path, default=None, help="the cross-validation multirun directory")
    p.add_argument("--ablations", type=Path, nargs="*", default=[], help="ablation run directories (same fold)")
    p.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args(argv)
    out = publish(args.run, args.dest, args.cv, args.ablations)
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
