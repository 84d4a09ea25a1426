"""Make training runs the shipped default model: weights, split and model card.

    python -m hippo.weights.publish RUN_DIR [RUN_DIR ...] [--cv DIR ...] [--ablations DIR ...] [--dest DIR]

Each ``RUN_DIR`` is a finished ``python -m hippo.train`` run (``model.pt``, ``split.json``,
``results.json``, ``val_results.json``). One run is shipped as it is; several — the folds of one
cross-validation or several views — become one ensemble file (probabilities averaged; weights
stored as int8 kernels with per-channel scales by default, ``--weights``), evaluated
here on their common held-out test split. ``--cv`` names the cross-validation folds whose
``val_results.json`` give the CV figures (multirun directories and/or single fold runs); ``--ablations`` are runs on one fold
whose figures go into the card's ablation table, each compared with the first of them. Writes ``hippocampus_25d.pt``, ``hippocampus_25d.split.json``,
``hippocampus_25d.cv.json`` and ``MODEL_CARD.md`` into ``--dest`` (default: this package's
directory, so the next install ships them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.infer import WEIGHT_FORMATS
from hippo.weights import DEFAULT_MODEL_NAME
from hippo.train.sweep_summary import summarize_cross_validation

CLASSES = ("anterior", "posterior")
# the model-quality targets (per-volume 3D Dice on held-out cases)
TARGETS = {"dice_anterior": 0.89, "dice_posterior": 0.88, "dice_foreground": 0.90}
WEIGHT_NOTES = {"float32": "float32", "float16": "float16",
                "int8": "int8 convolution kernels with a float32 scale per output channel, the rest float16"}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {path}: {exc}") from None


def _fmt(summary: dict[str, Any], key: str) -> str:
    """``mean ± SD`` over the volumes, and the 95 % interval of the mean where the summary has it."""
    v = summary.get(key)
    if not v:
        return "n/a"
    interval = f" ({v['ci_low']:.4f}–{v['ci_high']:.4f})" if "ci_low" in v and "ci_high" in v else ""
    return f"{v['mean']:.4f} ± {v['std']:.4f}{interval}"


def _overrides(run: Path) -> list[str]:
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    return [line[2:].strip() for line in f.read_text().splitlines() if line.startswith("- ")]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _config_diff(reference: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """``key=value`` of the data/model/trainer settings where ``other`` differs from ``reference``
    (``+key=value`` for a key the reference's configuration does not have, as Hydra wants it)."""
    a, b = (_with_defaults({k: v for k, v in _flatten(c).items() if k.startswith(_COMPARED)})
            for c in (reference, other))
    if "model.augmentation" in b and b["model.augmentation"] is None:     # augmentation off: one entry
        if any(k.startswith("model.augmentation.") for k in a):
            a = {k: v for k, v in a.items() if not k.startswith("model.augmentation.")}
            a["model.augmentation"] = "on"
    skip = ("data.root", "data.output_dir", "data.fold", "model.log_images_every_n_epochs")
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(skip) and a.get(k) != b.get(k))
    return [f"{'' if k in a else '+'}{k}={_hydra_value(b.get(k))}" for k in keys]


def _with_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with the keys added since a run was made filled in with the value it ran with;
    the augmentation keys only where the run had augmentation at all."""
    augmented = any(k.startswith("model.augmentation.") for k in flat)
    defaults = {k: v for k, v in _DEFAULTS.items() if augmented or not k.startswith("model.augmentation.")}
    return {**defaults, **flat}


def _hydra_value(v: Any) -> str:
    """``v`` written as a Hydra command-line override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


# the settings compared between runs (what a run's model depends on; not paths or logging)
_COMPARED = ("data.", "model.", *(f"trainer.{k}" for k in ("accelerator", "devices", "num_nodes", "strategy",
                                                             "precision", "max_epochs", "max_time")))
# settings added after some runs were made: a run without the key ran with this value
_DEFAULTS = {"data.normalization": "minmax_per_volume", "data.context_slices": 0, "model.largest_component": False,
             "model.deep_supervision": 0, "model.augmentation.p_elastic": 0.0,
             "model.augmentation.elastic_alpha": 3.0, "model.augmentation.elastic_sigma": 6.0}


def _where(training: dict[str, Any]) -> str:
    """The machine a run was fitted on (runs made before ``device`` was recorded: from the accelerator;
    the CPU runs of that time were made on the project's 2-core development machine)."""
    if training.get("device"):
        return training["device"]
    accelerator = training.get("accelerator", "?")
    return {"CPUAccelerator": f"{platform.machine()} CPU, 2 cores",
            "CUDAAccelerator": "one GPU (CUDA)"}.get(accelerator, accelerator)


def _metrics_row(label: str, summary: dict[str, Any]) -> str:
    return (f"| {label} | {summary['n_volumes']['count']} | {_fmt(summary, 'dice_anterior')} | "
            f"{_fmt(summary, 'dice_posterior')} | {_fmt(summary, 'dice_mean')} | {_fmt(summary, 'dice_foreground')} | "
            f"{_fmt(summary, 'jaccard_mean')} |")


def _reproduce(runs: Sequence[Path], cv: dict[str, Any] | None, ablations: Sequence[Path],
               results_of: dict[Path, dict[str, Any]]) -> list[str]:
    """Shell lines that re-train every run behind the card (members, CV folds, ablations) and publish them.

    Each run is written as the first run's command plus its settings that differ from the first
    run's (:func:`_config_diff`) and its fold, so a run made before a default changed still
    reproduces with today's configuration files. ``results_of``: each run's results.json already read
    (those missing from it are read here)."""
    def config(r: Path) -> dict[str, Any]:
        return (results_of.get(r) or _read(r / "results.json"))["config"]

    reference = config(runs[0])
    base = [o for o in _overrides(runs[0]) if not o.startswith(("hydra.", "data.fold="))]
    lines, seen = [], set()
    cv_runs = [Path(d) for d in (cv or {}).get("sources", {}).values()]
    for r in [*runs, *cv_runs, *ablations]:
        if r.resolve() in seen:
            continue
        seen.add(r.resolve())
        run_config = config(r)
        diff = _config_diff(reference, run_config)
        changed = {d.split("=", 1)[0] for d in diff}
        fold = run_config["data"].get("fold")
        changed |= {c.lstrip("+") for c in changed}
        overrides = [o for o in base if not any(o.split("=", 1)[0].lstrip("+") == c or o.startswith(c + ".")
                                                for c in changed)]
        overrides += diff
        overrides += [f"data.fold={fold}"] if fold is not None else []
        lines.append(f"python -m hippo.train {' '.join(overrides)} hydra.run.dir={r}")
    publish = "python -m hippo.weights.publish " + " ".join(map(str, runs))
    if cv_runs:
        publish += " --cv " + " ".join(map(str, cv_runs))
    if ablations:
        publish += " --ablations " + " ".join(map(str, ablations))
    return [*lines, publish, "python -m hippo.eval data.root=DATA_ROOT   # the shipped model on its test split"]


def render_card(runs: Sequence[Path], cv: dict[str, Any] | None, ablations: Sequence[Path],
                ensemble_test: dict[str, Any] | None = None, size_mib: float | None = None,
                weight_format: str = "float32") -> str:
    """The model card (Markdown) of the model made from ``runs`` (one run, or the members of an
    ensemble whose test summary is ``ensemble_test``)."""
    run = runs[0]
    results_of = {r: _read(r / "results.json") for r in [*runs, *ablations]}      # each file read once
    results = results_of[run]
    config, training = results["config"], results.get("training", {})
    split = _read(run / "split.json")
    net = config["model"]["net"]
    n = len(runs)
    axes = sorted({results_of[r]["config"]["data"].get("slice_axis", 0) for r in runs})
    filters = sorted({results_of[r]["config"]["model"]["net"]["initial_filters"] for r in runs})
    what = (f"an ensemble of {n} networks (softmax probabilities averaged; slicing axes {axes}, voxel axis 0 = "
            "left-right, 1 = anterior-posterior, 2 = inferior-superior)" if n > 1 else "one network")
    lines = [
        f"# Model card: `{DEFAULT_MODEL_NAME}` (the shipped default model)",
        "",
        f"Segments the anterior (label 1) and posterior (label 2) hippocampus in a T1-weighted MRI crop around one "
        f"hippocampus: {what}, each fed a slice with its neighbouring slices as extra channels (2.5D). Research use only: not a medical device, not validated for clinical decisions."
        + (f" File size {size_mib:.1f} MiB (weights stored as {WEIGHT_NOTES[weight_format]}, run in float32)."
           if size_mib else ""),
        "",
        "## Data",
        "- Medical Segmentation Decathlon, Task04_Hippocampus (Vanderbilt University Medical Center; "
        "licence CC-BY-SA 4.0): the labelled pairs present in the copy used "
        f"({sum(len(split[k]) for k in ('train', 'val', 'test'))} cases), 1 mm isotropic crops.",
        f"- Split by volume, seed {split['seed']}: {len(split['test'])} test cases held out from training "
        f"and model selection of every member (listed in `{DEFAULT_MODEL_NAME}.split.json`); the other "
        f"{len(split['train']) + len(split['val'])} cases cut into {split.get('num_folds')} cross-validation folds "
        f"(each fold model: {len(split['train'])} train / {len(split['val'])} val).",
        "",
        "## Configuration",
        f"- `python -m hippo.train {' '.join(o for o in _overrides(run) if not o.startswith('hydra.')) or 'experiment=hippocampus_25d'}`",
        *(["- Members (overrides of each run): " + "; ".join(
            f"`{' '.join(o for o in _overrides(r) if not o.startswith(('hydra.', 'data.root'))) or '(defaults)'}`"
            for r in runs)] if n > 1 else []),
        f"- Recursive 2D UNet, {'/'.join(map(str, filters))} filters at the top, depth {net['num_downs']}, "
        f"{net['norm']} norm, {net['in_channels']} input channels "
        f"({config['data']['context_slices']} neighbouring slices per side); "
        f"{config['data'].get('normalization', 'minmax_per_volume')} intensity normalisation; loss {config['model']['loss']}; "
        f"{config['model']['optimizer']['_target_'].rsplit('.', 1)[-1]} lr {config['model']['optimizer']['lr']}, "
        f"cosine schedule, {config['trainer']['max_epochs']} epochs, batch {config['data']['batch_size']}, "
        f"precision {training.get('precision', config['trainer']['precision'])}.",
        "- Augmentation: " + (", ".join(f"{k}={v}" for k, v in (config['model'].get('augmentation') or {}).items()
                                        if k != "_target_") or "none") + ".",
        f"- Post-processing: largest connected foreground component "
        f"{'kept' if config['model'].get('largest_component') else 'not applied'}.",
        "- Each member: best checkpoint by its fold's validation Dice (2D, per epoch).",
        "",
        "## Metrics (3D Dice per volume, mean ± sd)",
        "",
        "Each cell: mean ± standard deviation over the volumes, then, where the evaluation recorded it, the 95 % "
        "bootstrap interval of the mean in brackets.",
        "",
        "| model, cases | volumes | Dice anterior | Dice posterior | Dice mean | Dice foreground | Jaccard mean |",
        "|---|---|---|---|---|---|---|",
    ]
    if ensemble_test:
        lines.append(_metrics_row("**shipped ensemble, test (held out)**", ensemble_test))
    for r in runs:
        rr = results_of[r]
        fold, axis = _read(r / "split.json").get("fold"), rr["config"]["data"].get("slice_axis", 0)
        lines.append(_metrics_row(f"member: fold {fold}, slicing axis {axis}, alone, test (held out)", rr["summary"]))
    if cv:
        lines.append(_metrics_row(f"{cv['n_folds']}-fold cross-validation, pooled validation cases",
                                  {**cv["pooled"], "n_volumes": {"count": cv["n_volumes"]}}))
    shipped = ensemble_test or results["summary"]
    verdicts = []
    for key, name in (("dice_anterior", "anterior"), ("dice_posterior", "posterior"), ("dice_foreground", "foreground")):
        value, target = shipped[key]["mean"], TARGETS[key]
        verdicts.append(f"{name} {value:.4f} (target ≥ {target:.2f}: {'met' if value >= target else 'not met'})")
    lines += ["", "Against the project's targets on the held-out test split: " + ", ".join(verdicts) + "."]
    if cv:
        lines += ["", "Cross-validation per fold (mean Dice over that fold's validation volumes; the run of each fold):", "",
                  "| fold | Dice anterior | Dice posterior | Dice mean | run |", "|---|---|---|---|---|"]
        for fold, m in cv["folds"].items():
            lines.append(f"| {fold} | {m['dice_anterior']:.4f} | {m['dice_posterior']:.4f} | {m['dice_mean']:.4f} | "
                         f"{cv.get('sources', {}).get(str(fold), '')} |")
    if ablations:
        reference = results_of[ablations[0]]["config"]
        lines += ["", f"## Ablations (fold {reference['data'].get('fold')}; each run against the first)", "",
                  f"| run | change against {ablations[0].parent.name}/{ablations[0].name} | test Dice anterior | "
                  "test Dice posterior | val Dice anterior | val Dice posterior |",
                  "|---|---|---|---|---|---|"]
        for a in ablations:
            r, v = results_of[a]["summary"], _read(a / "val_results.json")["summary"]
            diff = _config_diff(reference, results_of[a]["config"])
            change = "(the reference)" if a == ablations[0] else ", ".join(diff) or "(the same configuration)"
            lines.append(f"| {a.parent.name}/{a.name} | {change} | "
                         f"{r['dice_anterior']['mean']:.4f} | {r['dice_posterior']['mean']:.4f} | "
                         f"{v['dice_anterior']['mean']:.4f} | {v['dice_posterior']['mean']:.4f} |")
    lines += ["", "## Training", "Fitting time (wall clock; a member that shared its machine with another job shows a "
              f"longer time), epochs run, and where; hippo {results.get('hippo_version')}:"]
    for r in runs:
        rr = results_of[r]
        t, data = rr.get("training", {}), rr["config"]["data"]
        lines.append(f"- fold {data.get('fold')}, slicing axis {data.get('slice_axis', 0)}, "
                     f"{rr['config']['model']['net']['initial_filters']} filters: {t.get('fit_seconds', 0) / 60:.1f} min, "
                     f"{t.get('epochs', '?')} epochs, {t.get('precision', '?')}, {_where(t)}")
    lines += [
        "",
        "## Reproduce",
        "Each run, then the publication and the check (`DATA_ROOT`: the Decathlon `Task04_Hippocampus` folder):",
        "```",
        *_reproduce(runs, cv, ablations, results_of),
        "```",
        "",
        "## Licence",
        "The weights are derived from the Decathlon hippocampus data (CC-BY-SA 4.0, Vanderbilt University "
        "Medical Center): credit the data set and share derived weights under the same licence.",
        "",
        "## Limits",
        "- Trained on 1 mm crops around one hippocampus (about 35 x 50 x 35 voxels); deployment takes the same "
        "kind of series (the HippoCrop series rule), or a whole-head 3D T1 that `hippo.wholehead` cuts into one "
        "such crop per side (docs/wholehead.md).",
        "- One site's research cohort; other scanners, field strengths and ages are untested on labels (real "
        "whole heads from other sites are compared with hippodeep and FreeSurfer in docs/wholehead.md).",
        "- Intended use, what the model was measured against, the evidence and where it fails, for a clinical "
        "reader: the validation plan, [docs/validation-plan.md](../../../docs/validation-plan.md).",
        "",
    ]
    return "\n".join(lines)


def _ensemble_split(runs: Sequence[Path]) -> dict[str, Any]:
    splits = [_read(r / "split.json") for r in runs]
    tests = {tuple(s["test"]) for s in splits}
    if len(tests) != 1:
        raise SystemExit("error: the runs do not share one test split (not folds of one cross-validation)")
    development = sorted(set().union(*(set(s["train"]) | set(s["val"]) for s in splits)))
    return {"seed": splits[0]["seed"], "root": splits[0].get("root"), "num_folds": splits[0].get("num_folds"),
            "train": development, "val": [], "test": list(splits[0]["test"]),
            "folds": {str(s.get("fold")): s["val"] for s in splits}}


def publish(runs: Sequence[Path], dest: Path, cv_dirs: Sequence[Path] = (), ablations: Sequence[Path] = (),
            data_root: Path | None = None, weight_format: str = "int8") -> dict[str, Path]:
    """Make ``runs`` the shipped model in ``dest``: one run is copied as it is; several (the folds
    of one cross-validation, or views) become one ensemble file with weights stored as
    ``weight_format`` (see :func:`hippo.infer.save_ensemble_file`), evaluated on their common test split
    (under ``data_root``, default the runs' ``data.root``). Writes the split and the model card."""
    from hippo.data.pairs import select_pairs
    from hippo.eval.evaluate import evaluate_model
    from hippo.infer import InferenceAgent, build_members, ensemble_payload, load_model_file, write_model_payload
    from hippo.metrics import summarize

    runs = [Path(r) for r in runs]
    for r in runs:
        if not (r / "model.pt").is_file():
            raise SystemExit(f"error: {r / 'model.pt'}: no exported model in this run")
    cv = None
    if cv_dirs:
        cv = summarize_cross_validation(*cv_dirs)
        if cv is None:
            raise SystemExit(f"error: {', '.join(map(str, cv_dirs))}: no fold val_results.json "
                             "(run with --multirun data.fold=0,1,2,3,4)")
    dest.mkdir(parents=True, exist_ok=True)
    out = {"model": dest / f"{DEFAULT_MODEL_NAME}.pt", "split": dest / f"{DEFAULT_MODEL_NAME}.split.json",
           "card": dest / "MODEL_CARD.md"}
    ensemble_test = None
    if len(runs) == 1:
        write_bytes_atomic(out["model"], (runs[0] / "model.pt").read_bytes())
        split = _read(runs[0] / "split.json")
        write_json_atomic(out["split"], split)
    else:
        split = _ensemble_split(runs)
        payloads = [load_model_file(r / "model.pt") for r in runs]
        members = [m for p in payloads for m in build_members(p)]
        root = Path(data_root or _read(runs[0] / "results.json")["config"]["data"]["root"])
        training = {"members": [p.get("training", {}) for p in payloads],
                    "split_sizes": {k: len(split[k]) for k in ("train", "val", "test")},
                    "data_root": str(root), "split_seed": split["seed"]}
        post = payloads[0].get("postprocessing")
        # evaluate the weights as they will be stored (int8 by default), then write the file once
        payload = ensemble_payload(members, postprocessing=post, training=training, weight_format=weight_format)
        write_json_atomic(out["split"], split)
        pairs, _ = select_pairs(str(root), split_file=str(out["split"]), split_part="test")
        rows, skipped = evaluate_model(InferenceAgent.from_payload(payload), pairs)
        if skipped or len(rows) != len(split["test"]):
            raise SystemExit(f"error: could not evaluate every test case under {root}: {skipped}")
        ensemble_test = summarize(rows)
        payload["metrics"] = {k: v["mean"] for k, v in ensemble_test.items() if "mean" in v}
        write_model_payload(out["model"], payload)
    size = out["model"].stat().st_size / 2 ** 20
    card = render_card(runs, cv, ablations, ensemble_test, size, weight_format if len(runs) > 1 else "float32")
    write_bytes_atomic(out["card"], card.encode())
    if cv is not None:
        write_json_atomic(dest / f"{DEFAULT_MODEL_NAME}.cv.json", cv)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Make a training run the shipped default model (weights, split, card).")
    p.add_argument("runs", type=Path, nargs="+", help="finished hippo.train run directories (several: an ensemble)")
    p.add_argument("--cv", type=Path, nargs="*", default=[],
                   help="the cross-validation folds: multirun directories and/or single fold runs")
    p.add_argument("--ablations", type=Path, nargs="*", default=[], help="ablation run directories (one fold; the first is the reference the others are compared with)")
    p.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--data-root", type=Path, default=None, help="where the test cases are (default: the runs' data.root)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="int8",
                   help="how an ensemble's weights are stored (int8: per-channel-scaled kernels, the smallest)")
    args = p.parse_args(argv)
    out = publish(args.runs, args.dest, args.cv, args.ablations, args.data_root, args.weights)
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
