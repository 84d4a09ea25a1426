"""``python -m hippo.scanner write|write-wholehead|send``: the scanner emulator's command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


from hippo.fileio import write_json_atomic
from hippo.scanner.sender import send_study
from hippo.scanner.studies import write_study, write_wholehead_study


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hippo.scanner",
                                     description="Emulate an MR scanner: write a DICOM study from NIfTI, send it.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a study (HippoCrop + distractor series) from a NIfTI image")
    w.add_argument("--nifti", required=True, help="NIfTI image (e.g. imagesTr/hippocampus_001.nii.gz)")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--label", default=None, help="NIfTI label: expected volumes go into the manifest")
    w.add_argument("--no-distractors", action="store_true", help="write only the HippoCrop series")
    w.add_argument("--seed", type=int, default=None, help="deterministic patient, UIDs and noise")
    w.add_argument("--nested", action="store_true", help="nested folders with non-DICOM junk files")
    w.add_argument("--manifest", default=None, help="also write the full manifest as JSON here")
    h = sub.add_parser("write-wholehead", help="write a brain study around a whole-head T1 (NIfTI/MGZ): 3D MPRAGE, "
                                               "localizers, T2, FLAIR, a reformat")
    h.add_argument("--scan", required=True, help="whole-head T1 (.nii, .nii.gz, .mgz)")
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--orientation", choices=("sagittal", "axial"), default="sagittal")
    h.add_argument("--no-t1", action="store_true", help="leave the T1 out (e.g. a localizer-only study)")
    h.add_argument("--no-distractors", action="store_true", help="no T2, FLAIR or reformat")
    h.add_argument("--no-localizer", action="store_true", help="no localizer series")
    h.add_argument("--seed", type=int, default=None, help="deterministic patient and UIDs")
    h.add_argument("--t1-layout", choices=("classic", "enhanced", "legacy"), default="classic",
                   help="how the T1 is stored: classic MR Image Storage, Enhanced MR, or Legacy Converted Enhanced MR")
    h.add_argument("--frames-per-instance", type=int, default=None,
                   help="enhanced layouts: slices per instance (default all in one; 1 = single-frame enhanced)")
    h.add_argument("--per-frame-groups", action="store_true",
                   help="enhanced layouts: pixel measures and orientation in each per-frame functional group item")
    s = sub.add_parser("send", help="C-STORE every DICOM file of a folder over one association")
    s.add_argument("--dir", required=True, help="folder to send (searched recursively)")
    s.add_argument("--host", required=True)
    s.add_argument("--port", required=True, type=int)
    s.add_argument("--called-ae", default="ORTHANC")
    s.add_argument("--calling-ae", default="HIPPOSCANNER")
    s.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    return parser


def _t1_layout(args: argparse.Namespace) -> dict | None:
    """The T1's write_series layout keywords from the write-wholehead options (None: classic)."""
    if args.t1_layout == "classic":
        if args.frames_per_instance is not None or args.per_frame_groups:
            raise ValueError("--frames-per-instance and --per-frame-groups need --t1-layout enhanced or legacy")
        return None
    return {"layout": args.t1_layout, "frames_per_instance": args.frames_per_instance,
            "functional_groups": "per_frame" if args.per_frame_groups else "shared"}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 error or failed instances, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "write":
            manifest = write_study(args.nifti, args.out, label_path=args.label, distractors=not args.no_distractors,
                                   seed=args.seed, nested=args.nested)
            if args.manifest:
                write_json_atomic(args.manifest, manifest)
            summary = {k: manifest[k] for k in ("study_instance_uid", "patient_id", "out_dir", "label_volumes_mm3")}
            summary["series"] = {d: s["n_instances"] for d, s in manifest["series"].items()}
            print(json.dumps(summary, indent=2))
            return 0
        if args.command == "write-wholehead":
            manifest = write_wholehead_study(args.scan, args.out, orientation=args.orientation, t1=not args.no_t1,
                                             distractors=not args.no_distractors, localizer=not args.no_localizer,
                                             seed=args.seed, t1_layout=_t1_layout(args))
            summary = {k: manifest[k] for k in ("study_instance_uid", "patient_id", "out_dir")}
            summary["series"] = {d: s["n_instances"] for d, s in manifest["series"].items()}
            print(json.dumps(summary, indent=2))
            return 0
        result = send_study(args.dir, args.host, args.port, called_ae=args.called_ae, calling_ae=args.calling_ae,
                            timeout_s=args.timeout)
        print(json.dumps(result, indent=2))
        if result["failed"]:
            print(f"hippo.scanner: error: {result['failed']} of {result['total']} instances failed "
                  f"(first: {result['failures'][0]['reason']})", file=sys.stderr)
            return 1
        return 0
    except Exception as exc:  # one line, no traceback, for scripts
        print(f"hippo.scanner: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
