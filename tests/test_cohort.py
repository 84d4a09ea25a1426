"""A cohort in parts (``hippo.wholehead.cohort``, ``run_participant``/``run_group`` of
``hippo.wholehead.run``, the QC report ``hippo.wholehead.cohort_report``).

Fast tests drive the participant and group levels with a small processor without a model
(:class:`FakeProcessor`: it writes the files a scan's processing writes, or raises for chosen
scans); the ``realdata`` tests run the real pipeline on the 1.75 mm example head
(``../shared/data/wholehead/example_brain_t1.nii.gz``, skipped when absent): a stage failing in
:class:`ScanProcessor`, and (``slow``) the command line: shards through Hydra's submitit launcher
(local executor, real submitit) then ``level=group`` against one plain run, and a shard killed mid-run
and run again.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hippo.scan_io import find_inputs
from hippo.wholehead import cohort
from hippo.wholehead.run import ScanOutcome, _line, output_paths, run_group, run_participant

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT.parent / "shared/data/wholehead/example_brain_t1.nii.gz"  # 137 x 137 x 93 at 1.75 mm
KEY = {"model_sha256": "m1", "hippo_version": "0", "settings_sha256": "s1"}


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 50, 50)).save(buf, format="PNG")
    return buf.getvalue()


class FakeProcessor:
    """Writes a scan's files like :class:`ScanProcessor` (label map stand-in, result.json, thumbnail),
    volumes from the file's first byte; raises for the names in ``fail``; logs each scan it processes
    to ``log`` (one line per scan, across processes)."""

    def __init__(self, out_root, layout="folder", fail=(), log=None):
        self.out_root, self.layout, self.fail, self.log = Path(out_root), layout, set(fail), log

    def process(self, scan):
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(scan.name + "\n")
        if scan.name in self.fail:
            raise RuntimeError(f"{scan.name}: boom in a stage")
        paths = output_paths(self.out_root, scan, self.layout)
        for k in ("dseg", "result"):
            paths[k].parent.mkdir(parents=True, exist_ok=True)
            paths[k].write_bytes(b"x")
        paths["thumbnail"].write_bytes(_png())
        b = Path(scan.path).read_bytes()[0]
        vol = {"anterior_mm3": 1500.0 + b, "posterior_mm3": 1500.0, "total_mm3": 3000.0 + b}
        return ScanOutcome(scan=str(scan.path), name=scan.name, status="ok", volumes={"left": vol, "right": vol},
                           asymmetry_index_percent=0.0, etiv_mm3=1.5e6 + 1e4 * b, bids_dir=scan.bids_dir,
                           files={k: str(paths[k]) for k in ("dseg", "result", "thumbnail")},
                           timings_s={"total": 0.01})


def _folder(tmp_path: Path, n: int = 5) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(n):
        (root / f"s{i}.nii.gz").write_bytes(bytes([i + 1]) * 16)
    return root


def _processed(log: Path) -> list[str]:
    return sorted(log.read_text().split()) if log.exists() else []


# ------------------------------------------------------------------------------------------ fast
def test_progress_line_survives_a_side_without_volume():
    """Issue 26: a side with no volume crashed the run at its progress line."""
    o = ScanOutcome(scan="/x/a.nii.gz", name="a", status="review",
                    volumes={"left": {"anterior_mm3": None, "posterior_mm3": None, "total_mm3": None},
                             "right": {"anterior_mm3": 1600.0, "posterior_mm3": 1500.0, "total_mm3": 3100.0}},
                    asymmetry_index_percent=None, etiv_mm3=None, review=["left: not found"])
    line = _line(o)
    assert line.startswith("a: left - mm³") and "right 3100 mm³" in line and "AI - %" in line
    assert "REVIEW: left: not found" in line
    assert _line(ScanOutcome(scan="/x/b", name="b", status="review")).startswith("b: left - mm³")
    assert "FAILED at register" in _line(ScanOutcome(scan="/x/c", name="c", stage="register", error="E"))


def test_shards_partition_the_scans_deterministically():
    scans = list(range(11))
    parts = [cohort.select_shard(scans, i, 4) for i in range(4)]
    assert sorted(x for p in parts for x in p) == scans and [len(p) for p in parts] == [3, 3, 3, 2]
    assert parts == [cohort.select_shard(scans, i, 4) for i in range(4)]
    assert cohort.parse_shard("2/4") == (2, 4) and cohort.parse_shard(None) is None
    for bad in ("4/4", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ValueError, match="shard="):
            cohort.parse_shard(bad)


def test_participant_label_picks_bids_subjects(tmp_path):
    bids = tmp_path / "bids"
    for sub in ("01", "02", "10"):
        (bids / f"sub-{sub}/anat").mkdir(parents=True)
        (bids / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz").write_bytes(b"x")
    scans = find_inputs(bids).scans
    pick = lambda v: [s.name for s in cohort.select_participants(scans, v, bids=True)]  # noqa: E731
    assert pick(None) == ["sub-01", "sub-02", "sub-10"]
    assert pick("01") == ["sub-01"] and pick("sub-10") == ["sub-10"] and pick(["01", "sub-02"]) == ["sub-01", "sub-02"]
    with pytest.raises(ValueError, match="no T1w scan for sub-03"):
        pick("03")
    with pytest.raises(ValueError, match="needs a BIDS dataset"):
        cohort.select_participants(scans, "01", bids=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_then_group_resume_and_a_failing_scan(tmp_path, workers):
    """Two shards write per-scan records only; the group level merges them (the failing scan a
    ``failed`` row naming it and the stage); a rerun processes only the failed scan; a changed file
    and a changed model are redone."""
    root = _folder(tmp_path)
    inputs = find_inputs(root)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    factory = functools.partial(FakeProcessor, out, fail={"s3"}, log=str(log))
    for i in range(2):
        run_participant(cohort.select_shard(inputs.scans, i, 2), factory, out, key=KEY, workers=workers)
    assert not (out / "volumes.tsv").exists()  # participant level: per-scan results only
    assert sorted(p.name for p in (out / "outcomes").iterdir()) == [f"s{i}.json" for i in range(5)]
    assert _processed(log) == [f"s{i}" for i in range(5)]

    summary = run_group(out, inputs, inputs.scans, KEY)
    assert (summary["n_ok"], summary["n_failed"], summary["n_missing"]) == (4, 1, 0)
    rows = [r.split("\t") for r in (out / "volumes.tsv").read_text().splitlines()]
    head, rows = rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert sorted(rows) == [f"s{i}" for i in range(5)]
    assert rows["s3"]["status"] == "failed" and rows["s3"]["stage"] == "process"
    assert "s3" in rows["s3"]["error"] and "RuntimeError" in rows["s3"]["error"]
    assert rows["s1"]["status"] == "ok" and float(rows["s1"]["left_total_mm3"]) == 3002.0
    assert head[-2:] == ["stage", "error"]
    page = (out / "qc_report.html").read_text()
    assert all(f">s{i}<" in page for i in range(5)) and page.index(">s3<") < page.index(">s0<")

    log.unlink()
    run_participant(inputs.scans, factory, out, key=KEY, workers=workers)
    assert _processed(log) == ["s3"]  # only the failed scan is redone

    log.unlink()
    (root / "s1.nii.gz").write_bytes(b"\x09" * 16)  # new content
    run_participant(inputs.scans, factory, out, key=KEY, workers=workers)
    assert _processed(log) == ["s1", "s3"]
    assert json.loads((out / "outcomes/s1.json").read_text())["outcome"]["volumes"]["left"]["total_mm3"] == 3009.0

    log.unlink()
    run_participant(inputs.scans, factory, out, key={**KEY, "model_sha256": "m2"}, workers=1)
    assert _processed(log) == [f"s{i}" for i in range(5)]


def test_group_level_names_missing_and_stale_scans(tmp_path):
    root = _folder(tmp_path, 4)
    inputs = find_inputs(root)
    out = tmp_path / "out"
    factory = functools.partial(FakeProcessor, out)
    run_participant(cohort.select_shard(inputs.scans, 0, 2), factory, out, key=KEY)  # s0, s2 only
    (root / "s2.nii.gz").write_bytes(b"\x07" * 17)  # changed after its result was made
    summary = run_group(out, inputs, inputs.scans, KEY)
    status = {s["name"]: (s["status"], s["error"]) for s in summary["scans"]}
    assert status["s0"][0] == "ok"
    assert status["s1"][0] == status["s3"][0] == "missing" and "has not run" in status["s1"][1]
    assert status["s2"][0] == "missing" and "changed" in status["s2"][1]
    summary = run_group(out, inputs, inputs.scans, {**KEY, "settings_sha256": "other"})
    assert summary["n_missing"] == 4 and "another model" in summary["scans"][0]["error"]


def test_killed_between_scans_loses_only_the_unfinished(tmp_path, monkeypatch):
    """A record is the scan's done mark, written atomically after its files: a run that stops after
    some scans leaves exactly those, and a rerun does the rest."""
    from hippo.wholehead import run as run_module

    root = _folder(tmp_path, 4)
    inputs = find_inputs(root)
    out, log = tmp_path / "out", tmp_path / "calls.log"

    class Stop(BaseException):  # like a kill: nothing after the second record happens
        pass

    real_record = run_module.write_record

    def record_then_stop(*a, **k):
        real_record(*a, **k)
        if len(list((out / "outcomes").iterdir())) >= 2:
            raise Stop

    factory = functools.partial(FakeProcessor, out, log=str(log))
    monkeypatch.setattr(run_module, "write_record", record_then_stop)
    with pytest.raises(Stop):
        run_participant(inputs.scans, factory, out, key=KEY)
    monkeypatch.setattr(run_module, "write_record", real_record)
    assert sorted(p.name for p in (out / "outcomes").iterdir()) == ["s0.json", "s1.json"]
    assert not list((out / "outcomes").glob(".*"))  # no half-written record left
    log.unlink()
    run_participant(inputs.scans, factory, out, key=KEY)
    assert _processed(log) == ["s2", "s3"]


def _outcome(name, status="ok", total=3000.0, etiv=1.5e6, ai=1.0, review=(), error="", stage=""):
    v = {"anterior_mm3": total / 2, "posterior_mm3": total / 2, "total_mm3": total}
    return ScanOutcome(scan=f"/d/{name}.nii.gz", name=name, status=status, stage=stage, error=error,
                       volumes={"left": v, "right": v} if status in ("ok", "review") else {},
                       asymmetry_index_percent=ai if status in ("ok", "review") else None,
                       etiv_mm3=etiv if status in ("ok", "review") else None, review=list(review)).as_dict()


def _cohort_outcomes():
    rng = np.random.default_rng(0)
    out = [_outcome(f"ok{i:02d}", etiv=e, total=2000 + 0.0008 * e + rng.normal(0, 40))
           for i, e in enumerate(np.linspace(1.3e6, 1.8e6, 12))]
    out.append(_outcome("big", etiv=1.5e6, total=5200.0))  # far off the line
    out.append(_outcome("flagged", status="review", review=["left: the mask touches its crop's edge"], ai=24.0))
    out.append(_outcome("broken", status="failed", stage="read", error="NotAScanError: /d/broken.nii.gz: damaged"))
    return out


def test_report_orders_failed_and_flagged_first_and_marks_outliers():
    from hippo.wholehead.cohort_report import render_group_report, volume_outliers

    outcomes = _cohort_outcomes()
    reasons, fits = volume_outliers(outcomes)
    assert set(reasons) == {"big"} and set(fits) == {"left", "right"}
    page = render_group_report(outcomes)
    pos = [page.index(f"<b class='name'>{n}</b>") for n in ("broken", "flagged", "big", "ok00")]
    assert pos == sorted(pos)
    assert "read: NotAScanError" in page and "outlier against eTIV" in page
    assert "src='http" not in page and "<script" not in page  # self-contained
    assert page.count("data:image/png;base64,") == 2  # the two plots (no thumbnails given)
    assert "1 failed" in page and "1 for review" in page and "1 volume outliers" in page


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.service
def test_report_renders_in_headless_chromium(tmp_path):
    """The page loads offline in headless Chromium: every scan named, failed and flagged first,
    thumbnails drawn from data URIs."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed")
    from PIL import Image

    from hippo.wholehead.cohort_report import write_group_report

    outcomes = _cohort_outcomes()
    thumb = tmp_path / "t.png"
    Image.new("RGB", (512, 128), (0, 200, 255)).save(thumb)
    for o in outcomes:
        o["files"] = {"thumbnail": str(thumb)}
    page = write_group_report(tmp_path / "qc_report.html", outcomes)
    thumb.unlink()  # the page must not need it any more
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}"]
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    names = [o["name"] for o in outcomes]
    assert all(f">{n}</b>" in dom for n in names)
    order = sorted(names, key=dom.index)
    assert order[:3] == ["broken", "flagged", "big"]
    shot = tmp_path / "shot.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1600, 1200)
    # the thumbnails (cyan, from the data URIs) were drawn
    assert ((img[..., 0] < 20) & (img[..., 1] > 180) & (img[..., 2] > 235)).sum() > 10_000


# ------------------------------------------------------------------------------------- real scans
def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"whole-head example scan not found at {path}")
    return path


@pytest.mark.realdata
def test_a_stage_that_raises_becomes_the_scans_failed_row(tmp_path, monkeypatch):
    """The real ScanProcessor with its registration stage raising: a failed outcome naming the scan
    and the stage (the model is never needed)."""
    from hippo.weights import default_model_path
    from hippo.wholehead import register
    from hippo.wholehead.run import ScanProcessor

    scan = require(EXAMPLE)

    def broken(*a, **k):
        raise FloatingPointError("optimizer diverged")

    monkeypatch.setattr(register, "register_to_template", broken)
    processor = ScanProcessor(default_model_path(), tmp_path, background_load=False)
    o = processor.process(scan)
    assert (o.status, o.stage) == ("failed", "register")
    assert str(scan) in o.error and "FloatingPointError: optimizer diverged" in o.error


FAST = ["progress=false", "precision=float32", "refine_passes=0", "extra_passes=0", "report.write_png=false",
        "threads=1"]


def predict(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    flags = [a for a in args if a.startswith("--")]  # Hydra's flags before the overrides
    return subprocess.run([sys.executable, "-m", "hippo.predict", *flags, *FAST,
                           *[a for a in args if not a.startswith("--")]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _heads(tmp_path: Path, n: int, corrupt: bool = False) -> Path:
    root = tmp_path / "heads"
    root.mkdir()
    for i in range(n):
        os.symlink(require(EXAMPLE), root / f"head{i}.nii.gz")
    if corrupt:
        (root / "zz_corrupt.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    return root


def _table(path: Path) -> dict[str, tuple]:
    rows = [r.split("\t") for r in path.read_text().splitlines()]
    keep = [c for c in rows[0] if c.endswith("_mm3") or c in ("status", "stage", "asymmetry_index_percent")]
    return {r[0]: tuple(dict(zip(rows[0], r))[c] for c in keep) for r in rows[1:]}


@pytest.mark.realdata
@pytest.mark.slow
def test_submitit_local_shards_then_group_equal_one_plain_run(tmp_path):
    """Two heads and a corrupt file: ``--multirun shard=0/2,1/2 hydra/launcher=submitit_local`` (each
    shard a submitit job) then ``level=group`` give the plain run's volumes.tsv volumes and statuses;
    the corrupt file is a failed row naming it and the stage; the QC report names every scan."""
    heads = _heads(tmp_path, 2, corrupt=True)
    plain = predict(f"input={heads}", f"output={tmp_path / 'plain'}")
    assert plain.returncode == 1, plain.stdout + plain.stderr  # the corrupt file failed
    counts = re.search(r"(\d+) ok, (\d+) for review, 1 failed", plain.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == 2, plain.stdout  # (no refinement: "did not settle")

    out = tmp_path / "sharded"
    r = predict("--multirun", f"input={heads}", f"output={out}", "shard=0/2,1/2", "hydra/launcher=submitit_local",
                f"hydra.sweep.dir={tmp_path / 'sweep'}")
    # a shard that recorded every scan (the corrupt one as failed) succeeds: the group level reports failures
    assert r.returncode == 0, r.stdout + r.stderr
    assert list((tmp_path / "sweep").rglob("*.submitit*")) or (tmp_path / "sweep/.submitit").is_dir()
    assert not (out / "volumes.tsv").exists() and len(list((out / "outcomes").glob("*.json"))) == 3
    shards = {json.loads(p.read_text())["shard"] for p in (out / "outcomes").glob("*.json")}
    assert shards == {"0/2", "1/2"}
    g = predict(f"input={heads}", f"output={out}", "level=group")
    assert g.returncode == 1 and counts[0] in g.stdout, g.stdout + g.stderr
    assert _table(out / "volumes.tsv") == _table(tmp_path / "plain/volumes.tsv")
    bad = _table(out / "volumes.tsv")["zz_corrupt"]
    assert "failed" in bad and "read" in bad
    assert "zz_corrupt.nii.gz" in (out / "volumes.tsv").read_text()
    page = (out / "qc_report.html").read_text()
    assert page.index(">zz_corrupt<") < page.index(">head0<") < page.index(">head1<")
    assert page.count("data:image/png;base64,") == 2 + 2  # plots + a thumbnail per measured head


@pytest.mark.realdata
@pytest.mark.slow
def test_a_killed_shard_redoes_only_its_unfinished_scans(tmp_path):
    heads = _heads(tmp_path, 3)
    out = tmp_path / "out"
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "hippo.predict", *FAST, f"input={heads}", f"output={out}", "shard=0/1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and len(list((out / "outcomes").glob("*.json"))) < 1:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in (out / "outcomes").glob("*.json"))
    assert 1 <= len(done) < 3, done
    before = {n: (out / "outcomes" / n).read_bytes() for n in done}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(done)} scan(s) already measured with this model and settings (reused), {3 - len(done)} to process" \
        in r.stdout
    processed = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("head") and "mm³" in line]
    assert sorted(processed) == sorted(f"head{i}" for i in range(3) if f"head{i}.json" not in done)
    assert all((out / "outcomes" / n).read_bytes() == b for n, b in before.items())  # untouched


@pytest.mark.realdata
@pytest.mark.slow
def test_bench_cohort_smoke(tmp_path):
    """benchmarks/bench_cohort.py runs its three modes on one head and writes its figures."""
    require(EXAMPLE)
    out = tmp_path / "cohort.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_cohort.py"), "--heads", "1", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"plain (workers=1)", "workers=2", "submitit-local, 2 shards + group"}
    assert all(m["measured"] == 1 and m["heads_per_min"] > 0 for m in modes.values())
    assert modes["plain (workers=1)"]["ratio_vs_plain"] == 1.0
