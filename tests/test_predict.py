"""``python -m hippo.predict``: the config, one file, a BIDS dataset (derivatives layout, a bad scan
that does not stop the rest, exit status), label maps refused by name, and the real folder
``../shared/data/wholehead`` end to end (``slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hippo.config import config_dir

ROOT = Path(__file__).resolve().parents[1]
WHOLEHEAD = ROOT.parent / "shared/data/wholehead"
EXAMPLE = WHOLEHEAD / "example_brain_t1.nii.gz"  # the smallest real scan (137 x 137 x 93 at 1.75 mm)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"whole-head scans not found at {path}")
    return path


def predict(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", "hippo.predict", "progress=false", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_config_composes_with_the_house_groups():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["input=/x", "output=/y", "workers=2"])
    assert cfg.input == "/x" and cfg.output == "/y" and cfg.workers == 2
    assert cfg.plausibility.total_mm3[0] > 0 and "write_png" in cfg.report
    assert cfg.registration.preset == "fast" and cfg.precision == "auto"  # from conf/inference: one default
    assert cfg.model_path is None and cfg.device == "cpu" and cfg.batch_size == 64  # from conf/inference


def test_entrypoint_stays_thin():
    """hippo.predict only calls hippo.wholehead.run.run_predict; the whole-head modules and scan_io
    never import Lightning or Hydra."""
    code = ("import sys, hippo.scan_io, hippo.wholehead.run, hippo.wholehead.segment, hippo.wholehead.register, "
            "hippo.wholehead.page; bad = [m for m in ('lightning', 'hydra', 'pytorch_lightning', 'torch') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    text = (ROOT / "src/hippo/predict.py").read_text()
    assert "run_predict(OmegaConf.to_container(cfg, resolve=True))" in text


def test_no_input_is_a_clear_error(tmp_path):
    r = predict(f"output={tmp_path}")
    assert r.returncode != 0 and "give input=PATH" in r.stderr + r.stdout
    r = predict(f"input={tmp_path / 'missing'}", f"output={tmp_path / 'out'}")
    assert r.returncode != 0 and "no such file or folder" in r.stderr + r.stdout


@pytest.mark.realdata
def test_one_file(tmp_path):
    scan = require(EXAMPLE)
    out = tmp_path / "out"
    r = predict(f"input={scan}", f"output={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "example_brain_t1: left" in r.stdout
    folder = out / "example_brain_t1"
    dseg = nib.load(str(folder / "example_brain_t1_desc-hippo_dseg.nii.gz"))
    source = nib.load(str(scan))
    assert dseg.shape == source.shape and np.allclose(dseg.affine, source.affine)  # the scan's own grid (LAS)
    labels = np.asarray(dseg.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    # left labels (1, 2) lie at negative x (patient's left), right labels (3, 4) at positive x
    xyz = lambda sel: (np.argwhere(sel) @ dseg.affine[:3, :3].T + dseg.affine[:3, 3]).mean(0)  # noqa: E731
    assert xyz(np.isin(labels, (1, 2)))[0] < 0 < xyz(np.isin(labels, (3, 4)))[0]
    result = json.loads((folder / "result.json").read_text())
    v = result["volumes_mm3"]
    voxel = float(np.prod(source.header.get_zooms()[:3]))
    # the label map's own volumes are its voxel counts x the scan's voxel volume; the reported volumes
    # are the ensemble's expected (soft) volumes, within a few % of the counts on these coarse voxels
    label_map = {s: result["details"][s]["label_map_mm3"] for s in ("left", "right")}
    assert label_map["left"]["total"] == pytest.approx(np.isin(labels, (1, 2)).sum() * voxel, rel=1e-4)
    assert label_map["right"]["anterior"] == pytest.approx((labels == 3).sum() * voxel, rel=1e-4)
    for side in ("left", "right"):
        assert v[side]["total_mm3"] == pytest.approx(label_map[side]["total"], rel=0.05)
        assert v[side]["total_mm3"] == pytest.approx(v[side]["anterior_mm3"] + v[side]["posterior_mm3"], rel=1e-6)
    for side in ("left", "right"):
        assert 2000 < v[side]["total_mm3"] < 4500
    ai = result["asymmetry_index_percent"]
    l, rt = v["left"]["total_mm3"], v["right"]["total_mm3"]
    assert ai == pytest.approx(100 * (l - rt) / ((l + rt) / 2), abs=0.01)
    assert 1.2e6 < result["etiv_mm3"] < 1.8e6 and "1,948,106" in result["etiv_method"]
    assert result["review"] == [] and result["status"] == "ok"
    for stage in ("read", "register", "infer", "map_back", "report", "write", "total"):
        assert stage in result["timings_s"]
    assert (folder / "report.png").stat().st_size > 10_000
    assert (out / "volumes.tsv").read_text().count("\n") == 2
    assert (out / "desc-hippo_dseg.tsv").read_text().startswith("index\tname\n0\tbackground\n1\tleft anterior")


@pytest.mark.realdata
def test_bids_dataset_with_a_bad_scan(tmp_path):
    """Two subjects (one with a session) and one broken T1w: a BIDS-derivatives dataset for the two,
    the broken one named in the summary, exit status 1."""
    scan = require(EXAMPLE)
    bids = tmp_path / "bids"
    (bids / "sub-01/anat").mkdir(parents=True)
    (bids / "sub-02/ses-pre/anat").mkdir(parents=True)
    (bids / "sub-03/anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    os.symlink(scan, bids / "sub-01/anat/sub-01_T1w.nii.gz")
    os.symlink(scan, bids / "sub-02/ses-pre/anat/sub-02_ses-pre_T1w.nii.gz")
    (bids / "sub-03/anat/sub-03_T1w.nii.gz").write_bytes(b"\x1f\x8b broken")
    out = tmp_path / "derivatives" / "hippo"
    r = predict(f"input={bids}", f"output={out}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sub-03_T1w.nii.gz" in r.stdout and "FAILED" in r.stdout
    assert "2 ok, 0 for review, 1 failed" in r.stdout
    for rel in ("sub-01/anat/sub-01_desc-hippo_dseg.nii.gz", "sub-01/anat/sub-01_desc-hippo_result.json",
                "sub-01/anat/sub-01_desc-hippo_report.png",
                "sub-02/ses-pre/anat/sub-02_ses-pre_desc-hippo_dseg.nii.gz"):
        assert (out / rel).is_file(), rel
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "hippo"
    assert (out / "desc-hippo_dseg.tsv").is_file()
    rows = [line.split("\t") for line in (out / "volumes.tsv").read_text().splitlines()]
    assert rows[0][:2] == ["participant_id", "session_id"]
    assert [r[:2] for r in rows[1:]] == [["sub-01", "n/a"], ["sub-02", "ses-pre"], ["sub-03", "n/a"]]
    a = json.loads((out / "sub-01/anat/sub-01_desc-hippo_result.json").read_text())["volumes_mm3"]
    b = json.loads((out / "sub-02/ses-pre/anat/sub-02_ses-pre_desc-hippo_result.json").read_text())["volumes_mm3"]
    assert a == b  # the same scan twice: deterministic
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["scans"][2]["stage"] == "read"


@pytest.mark.realdata
def test_a_named_label_map_is_refused(tmp_path):
    aseg = require(WHOLEHEAD / "fs_subject/aparc.a2009s+aseg.mgz")
    r = predict(f"input={aseg}", f"output={tmp_path}")
    assert r.returncode == 1
    assert "aparc.a2009s+aseg.mgz: a label map, not a scan" in r.stdout


@pytest.mark.realdata
@pytest.mark.slow
def test_the_real_folder_end_to_end(tmp_path):
    """``input=../shared/data/wholehead``: the three scans processed with two workers, the FreeSurfer
    label map and the two atlas files skipped as not scans; exit 0."""
    root = require(WHOLEHEAD)
    out = tmp_path / "out"
    r = predict(f"input={root}", f"output={out}", "workers=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "aparc.a2009s+aseg.mgz: skipped (a label map" in r.stdout
    # every NIfTI/MGZ scan of the folder is measured (the folder grows: no fixed count), none fails,
    # the label map and the two atlases are skipped; the three clean adult scans are ok
    scans = {p.name.split(".")[0] for p in root.rglob("*") if p.name.endswith((".nii.gz", ".nii", ".mgz"))
             and "atlas" not in p.parts and not p.name.startswith("aparc")}
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["scans"]}
    measured = {n for n, st in status.items() if st in ("ok", "review")}
    assert summary["n_failed"] == 0 and summary["n_skipped"] == 3 and len(measured) == len(scans), status
    assert all((out / n).is_dir() for n in measured)
    assert all(status[n] == "ok" for n in ("chris_t1", "example_brain_t1", "fs_subject_norm")), status


def test_cohort_keys_and_launcher_configs_compose():
    """The cohort keys default to a plain run; the sample launchers extend Hydra's submitit ones."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["input=/x"])
        assert cfg.level is None and cfg.shard is None and cfg.participant_label is None and cfg.resume is True
        cfg = compose(config_name="predict", overrides=["input=/x", "shard=1/4", "participant_label=[01,02]"],
                      return_hydra_config=True)
        assert cfg.shard == "1/4" and list(cfg.participant_label) == ["01", "02"]
        slurm = compose(config_name="predict", overrides=["input=/x", "hydra/launcher=cohort_slurm",
                                                          "hydra.launcher.partition=short"], return_hydra_config=True)
        launcher = slurm.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "short"
        assert launcher.cpus_per_task == 2 and launcher.mem_per_cpu == "4GB" and launcher.timeout_min == 240
        local = compose(config_name="predict", overrides=["input=/x", "hydra/launcher=cohort_local"],
                        return_hydra_config=True)
        assert local.hydra.launcher._target_.endswith("LocalLauncher")


def test_bad_cohort_arguments_are_clear(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.nii.gz").write_bytes(b"x")
    for args, message in ((["shard=4/4"], "shard='4/4': I must be 0..N-1"),
                          (["shard=0/2", "level=group"], "the group level reads every scan"),
                          (["level=everything"], "level='everything'"),
                          (["participant_label=01"], "participant_label needs a BIDS dataset")):
        r = predict(f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", *args)
        assert r.returncode != 0 and message in r.stderr + r.stdout, (args, r.stderr[-2000:])
