"""docs/conformance.md against the code: the tables marked ``<!-- table: NAME -->`` are parsed and
compared with what the listener accepts (its AE as started), what the result sender, ``echo`` and the
scanner emulator propose (captured by a Storage SCP on loopback), the AE titles and ports of the
configuration, the association identification and rejections, the C-STORE statuses, and the objects
the pipeline creates (SOP classes, series, transfer syntax, character set, file meta, modules).

Adding a SOP class or transfer syntax to the listener, proposing another context, changing an AE
title, a port or what the result objects contain without updating the conformance statement makes
one of these tests fail.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from omegaconf import OmegaConf
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import (ALL_TRANSFER_SYNTAXES, AE, PYNETDICOM_IMPLEMENTATION_UID,
                        PYNETDICOM_IMPLEMENTATION_VERSION)
from pynetdicom.sop_class import (Comprehensive3DSRStorage, CTImageStorage, MRImageStorage,
                                  SecondaryCaptureImageStorage, SegmentationStorage, Verification)

from conftest import synthetic_crop_pair
from hippo.network.listener import (STATUS_CANNOT_UNDERSTAND, STATUS_INVALID_UID, STATUS_OUT_OF_RESOURCES,
                                    STORAGE_SOP_CLASSES, Listener)
from hippo.network.orthanc import free_port
from hippo.pacs import PacsConfig, echo, send

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance.md"
TABLE_IDS = (
    "network-services", "listener-sop-classes", "listener-association-parameters", "implementation-identification",
    "listener-allowed-calling-aets", "listener-association-rejections", "listener-storage-transfer-syntaxes",
    "listener-verification-transfer-syntaxes", "listener-c-store-status", "sender-sop-classes",
    "sender-association-parameters", "sender-storage-contexts", "sender-verification-contexts",
    "sender-c-store-status", "scanner-storage-contexts", "ae-configuration", "created-objects",
    "iod-report_sc", "iod-seg", "iod-sr", "source-layouts",
)


# ----------------------------------------------------------------------------------------------
# Reading the document


def _cell(text: str) -> str:
    return text.replace("`", "").replace("\\*", "*").replace("**", "").strip()


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """``{name: [row as {column header: cell}]}`` for every ``<!-- table: name -->`` marker followed
    (after blank lines) by a Markdown table."""
    lines = text.splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!--\s*table:\s*([\w.-]+)\s*-->", line.strip())
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        assert j < len(lines) and lines[j].lstrip().startswith("|"), f"table {m.group(1)}: no table after marker"
        header = [_cell(c) for c in lines[j].strip().strip("|").split("|")]
        rows = []
        for row_line in lines[j + 2:]:
            if not row_line.lstrip().startswith("|"):
                break
            cells = [_cell(c) for c in row_line.strip().strip("|").split("|")]
            assert len(cells) == len(header), f"table {m.group(1)}: {row_line!r} has {len(cells)} cells"
            rows.append(dict(zip(header, cells)))
        assert m.group(1) not in tables, f"table {m.group(1)} defined twice"
        tables[m.group(1)] = rows
    return tables


@pytest.fixture(scope="module")
def tables() -> dict[str, list[dict[str, str]]]:
    return parse_tables(DOC.read_text(encoding="utf-8"))


def _column(rows, name) -> list[str]:
    return [r[name] for r in rows]


def _values(rows) -> dict[str, str]:
    """A two-column (name, value) table as a dict."""
    return {r[next(iter(r))]: list(r.values())[1] for r in rows}


def _first_int(text: str) -> int:
    return int(re.match(r"\s*(\d+)", text).group(1))


def _pairs(rows, abstract="Abstract Syntax UID", transfer="Transfer Syntax UID") -> set[tuple[str, str]]:
    return {(r[abstract], r[transfer]) for r in rows}


def test_every_table_is_there_and_parses(tables):
    missing = [t for t in TABLE_IDS if not tables.get(t)]
    assert not missing, f"tables missing or empty in {DOC}: {missing}"
    assert re.search(r"^### A\.\d+ Validation", DOC.read_text(encoding="utf-8"), re.M)


# ----------------------------------------------------------------------------------------------
# The AI listener


class _NoProcessing:
    def process(self, study_dir):  # pragma: no cover - nothing is processed here
        raise AssertionError("conformance tests do not process studies")


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    """The listener as ``conf/listen.yaml`` configures it (on a free port), started: its AE is the one
    that answers associations."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "listen.yaml"))
    lc = cfg["listener"]
    lst = Listener(ae_title=lc["ae_title"], host=lc["host"], port=free_port(),
                   allowed_calling_aets=lc["allowed_calling_aets"], max_associations=lc["max_associations"],
                   root=tmp_path_factory.mktemp("listener"), processor_factory=_NoProcessing, quiet_seconds=3600,
                   stop_timeout=10)
    lst.start()
    yield lst
    lst.stop(timeout=10)


def _accepted(listener) -> dict[str, set[str]]:
    return {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax}
            for cx in listener._ae.supported_contexts}


def test_listener_sop_classes_are_documented(tables, listener):
    accepted = _accepted(listener)
    rows = tables["listener-sop-classes"]
    documented = _column(rows, "SOP Class UID")
    assert len(documented) == len(set(documented))
    assert set(documented) == set(accepted), (
        f"undocumented: {sorted(set(accepted) - set(documented))}; "
        f"documented but not accepted: {sorted(set(documented) - set(accepted))}")
    assert set(accepted) == {*map(str, STORAGE_SOP_CLASSES), str(Verification)}
    for r in rows:
        assert r["SOP Class"] == UID(r["SOP Class UID"]).name
        assert (r["SCU"], r["SCP"]) == ("No", "Yes")
    services = tables["network-services"]
    assert {r["SOP Class UID"] for r in services if r["SCP"] == "Yes"} == set(accepted)


def test_listener_transfer_syntaxes_are_documented(tables, listener):
    from pydicom.pixels import get_decoder

    accepted = _accepted(listener)
    storage_rows = tables["listener-storage-transfer-syntaxes"]
    documented = _column(storage_rows, "Transfer Syntax UID")
    assert len(documented) == len(set(documented))
    for sop_class in STORAGE_SOP_CLASSES:
        assert accepted[str(sop_class)] == set(documented), UID(sop_class).name
    assert set(documented) == set(map(str, ALL_TRANSFER_SYNTAXES))
    verification = _column(tables["listener-verification-transfer-syntaxes"], "Transfer Syntax UID")
    assert accepted[str(Verification)] == set(verification)

    for r in storage_rows + tables["listener-verification-transfer-syntaxes"]:
        uid = UID(r["Transfer Syntax UID"])
        if uid.name != str(uid):  # a name pydicom (or pynetdicom) knows
            assert r["Transfer Syntax"] == uid.name
    for r in storage_rows:  # the decoder column matches the installed pydicom plugins
        uid = UID(r["Transfer Syntax UID"])
        try:
            decoder = get_decoder(uid)
            available, plugins = decoder.is_available, set(decoder.available_plugins)
        except NotImplementedError:
            available, plugins = False, set()
        if r["Decoder"] == "none":
            assert not available, f"{uid.name}: documented as not decodable, but {sorted(plugins)} decode it"
        elif r["Decoder"] == "pydicom (native)":
            assert not uid.is_compressed and available, uid.name
        else:
            listed = {p.strip() for p in r["Decoder"].split(",")}
            assert available and listed <= plugins, f"{uid.name}: documented {listed}, installed {plugins}"
        if r["Processed"].startswith("yes"):
            assert available, f"{uid.name} documented as processed but not decodable"


def _associate(port: int, calling: str, called: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(assoc) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


def test_listener_association_policies_are_documented(tables, listener, tmp_path):
    cfg = OmegaConf.load(ROOT / "conf" / "listen.yaml")
    allowed = _column(tables["listener-allowed-calling-aets"], "Allowed Calling AE Title")
    assert allowed == list(listener.allowed_calling_aets) == list(cfg.listener.allowed_calling_aets)

    params = _values(tables["listener-association-parameters"])
    assert _first_int(params["Maximum simultaneous associations"]) == listener._ae.maximum_associations \
        == cfg.listener.max_associations
    assert _first_int(params["ACSE timeout (s)"]) == listener._ae.acse_timeout
    assert _first_int(params["DIMSE timeout (s)"]) == listener._ae.dimse_timeout
    assert _first_int(params["Network idle timeout (s)"]) == listener._ae.network_timeout

    ident = _values(tables["implementation-identification"])
    assoc = _associate(listener.port, allowed[0], listener.ae_title)
    assert assoc.is_established
    try:
        acceptor = assoc.acceptor
        assert acceptor.implementation_class_uid == ident["Implementation Class UID"] == PYNETDICOM_IMPLEMENTATION_UID
        assert acceptor.implementation_version_name == ident["Implementation Version Name"] \
            == PYNETDICOM_IMPLEMENTATION_VERSION
        assert acceptor.maximum_length == _first_int(params["Maximum PDU length received"])
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()

    rejections = {r["Condition"]: tuple(_first_int(r[k]) for k in ("Result", "Source", "Reason/Diag."))
                  for r in tables["listener-association-rejections"]}
    assoc = _associate(listener.port, "STRANGER", listener.ae_title)
    assert assoc.is_rejected and _rejection(assoc) == rejections["Calling AE Title not in the allowed list"]
    assoc = _associate(listener.port, allowed[0], "NOTHIPPOAI")
    assert assoc.is_rejected and _rejection(assoc) == rejections["Called AE Title is not the listener's"]

    busy = Listener(ae_title=listener.ae_title, port=free_port(), allowed_calling_aets=allowed, max_associations=1,
                    root=tmp_path / "busy", processor_factory=_NoProcessing, quiet_seconds=3600, stop_timeout=10)
    busy.start()
    try:
        first = _associate(busy.port, allowed[0], busy.ae_title)
        assert first.is_established
        second = _associate(busy.port, allowed[0], busy.ae_title)
        assert second.is_rejected and _rejection(second) == rejections["Maximum number of associations reached"]
        first.release()
    finally:
        busy.stop(timeout=10)


def test_listener_c_store_statuses_are_documented(tables):
    codes = {int(r["Code"], 16): r["Status"] for r in tables["listener-c-store-status"]}
    assert codes == {0x0000: "Success", STATUS_INVALID_UID: "Failure", STATUS_OUT_OF_RESOURCES: "Failure",
                     STATUS_CANNOT_UNDERSTAND: "Failure", 0xC211: "Failure"}


# ----------------------------------------------------------------------------------------------
# What the senders propose (captured by a Storage SCP on loopback, tests/fakes.py)


@pytest.fixture
def scp(storage_scp):
    """``scp(sop_classes)``: a Storage SCP accepting them (any transfer syntax) that records every
    A-ASSOCIATE-RQ (``association_requests``)."""
    return lambda sop_classes=(): storage_scp(sop_classes=sop_classes, transfer_syntaxes=ALL_TRANSFER_SYNTAXES)


def _result_like(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _flatten(contexts) -> set[tuple[str, str]]:
    return {(ab, ts) for ab, tss in contexts for ts in tss}


def test_result_sender_contexts_are_documented(tables, scp):
    from hippo.dicom.report import SC_SOP_CLASS_UID

    results = (SC_SOP_CLASS_UID, str(SegmentationStorage), str(Comprehensive3DSRStorage))
    peer = scp(results)
    report = send([_result_like(c) for c in results], PacsConfig(port=peer.port, retries=0, timeout=10))
    assert report.ok, report
    (request,) = peer.association_requests
    documented = tables["sender-storage-contexts"]
    assert _flatten(request["contexts"]) == _pairs(documented)
    for ab, tss in request["contexts"]:  # one context per SOP class, both uncompressed syntaxes in it
        assert tss == [ExplicitVRLittleEndian, ImplicitVRLittleEndian], UID(ab).name
    assert len(request["contexts"]) == len(results)
    for r in documented:
        assert r["Abstract Syntax"] == UID(r["Abstract Syntax UID"]).name
        assert r["Transfer Syntax"] == UID(r["Transfer Syntax UID"]).name
        assert (r["Role"], r["Extended Negotiation"]) == ("SCU", "None")
    sender_classes = {r["SOP Class UID"] for r in tables["sender-sop-classes"]}
    assert sender_classes == {*results, str(Verification)}

    ident = _values(tables["implementation-identification"])
    assert request["implementation_class_uid"] == ident["Implementation Class UID"]
    assert request["implementation_version_name"] == ident["Implementation Version Name"]
    params = _values(tables["sender-association-parameters"])
    assert request["maximum_length"] == _first_int(params["Maximum PDU length received"]) == PacsConfig().max_pdu

    defaults = PacsConfig()
    timeouts = params["Connection, ACSE, DIMSE and network timeouts (s)"]
    assert _first_int(timeouts) == defaults.timeout
    assert _first_int(params["Association retries"]) == defaults.retries
    assert f"{defaults.backoff:g} s" in params["Association retries"]


def test_echo_contexts_are_documented(tables, scp):
    peer = scp()
    assert echo(PacsConfig(port=peer.port, retries=0, timeout=10))
    (request,) = peer.association_requests
    assert _flatten(request["contexts"]) == _pairs(tables["sender-verification-contexts"])


def test_scanner_contexts_are_documented(tables, scp, tmp_path):
    from hippo.scanner import StudyInfo, send_study, write_series

    study = StudyInfo(seed=4)
    vol = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)
    write_series(vol, np.eye(4), tmp_path / "study", study=study, modality="MR", file_names="uid")
    write_series(vol, np.eye(4), tmp_path / "study", study=study, modality="CT", series_number=2,
                 file_names="uid", series_description="CT")
    peer = scp((MRImageStorage, CTImageStorage))
    result = send_study(tmp_path / "study", "127.0.0.1", peer.port, called_ae="ORTHANC", timeout_s=10)
    assert result["failed"] == 0, result
    (request,) = peer.association_requests
    assert _flatten(request["contexts"]) == _pairs(tables["scanner-storage-contexts"])
    assert {r["SOP Class UID"] for r in tables["network-services"] if r["SCU"] == "Yes"} == (
        {r["Abstract Syntax UID"] for r in tables["sender-storage-contexts"] + tables["scanner-storage-contexts"]
         + tables["sender-verification-contexts"]})


# ----------------------------------------------------------------------------------------------
# AE titles and ports


def test_ae_titles_and_ports_are_documented(tables):
    from hippo.scanner import send_study
    from hippo.scanner.__main__ import _parser

    rows = {r["Application Entity"]: r for r in tables["ae-configuration"]}
    listen = OmegaConf.load(ROOT / "conf" / "listen.yaml").listener
    pacs = OmegaConf.load(ROOT / "conf" / "pacs" / "local.yaml")
    network = OmegaConf.load(ROOT / "conf" / "network.yaml")
    defaults = inspect.signature(Listener).parameters

    r = rows["AI listener"]
    assert r["AE Title"] == listen.ae_title == defaults["ae_title"].default == network.listener.ae_title
    assert r["Host"] == listen.host == defaults["host"].default
    assert int(r["Port"]) == listen.port == defaults["port"].default == network.listener.port

    assert rows["Result sender (calling AE)"]["AE Title"] == pacs.calling_ae == PacsConfig().calling_ae
    r = rows["PACS called by the result sender"]
    assert r["AE Title"] == pacs.called_ae == PacsConfig().called_ae == network.orthanc.aet
    assert r["Host"] == pacs.host == PacsConfig().host
    assert int(r["Port"]) == pacs.port == PacsConfig().port == network.orthanc.dicom_port

    cli = _parser().parse_args(["send", "--dir", "x", "--host", "h", "--port", "1"])
    scanner = inspect.signature(send_study).parameters
    assert rows["Scanner emulator (calling AE)"]["AE Title"] == cli.calling_ae == scanner["calling_ae"].default
    assert rows["PACS called by the scanner emulator"]["AE Title"] == cli.called_ae == scanner["called_ae"].default
    assert network.orthanc.modalities.scanner.aet == cli.calling_ae


# ----------------------------------------------------------------------------------------------
# The objects created


@pytest.fixture(scope="module")
def created(tmp_path_factory, model_file):
    """(outcome, source dataset) of the real pipeline (a small random model) on a synthetic study
    written by the scanner emulator."""
    from hippo.deploy.pipeline import build_processor
    from hippo.scanner import write_study

    root = tmp_path_factory.mktemp("created")
    image, _ = synthetic_crop_pair(root)
    manifest = write_study(image, root / "study", seed=7, distractors=False)
    outcome = build_processor(model_file, root / "results", write_png=False, io_threads=2).process(root / "study")
    assert outcome.status != "failed", f"{outcome.stage}: {outcome.error}"
    source = pydicom.dcmread(manifest["files"]["HippoCrop"][0], stop_before_pixels=True)
    return outcome, source


def test_created_objects_are_documented(tables, created):
    outcome, source = created
    rows = {r["Object"]: r for r in tables["created-objects"]}
    assert set(rows) == {"report_sc", "seg", "sr"}
    expected_class = {"report_sc": SecondaryCaptureImageStorage, "seg": SegmentationStorage,
                      "sr": Comprehensive3DSRStorage}
    from hippo.dicom.report import SC_SOP_CLASS_UID

    assert expected_class["report_sc"] == SC_SOP_CLASS_UID
    sender_classes = {r["Abstract Syntax UID"] for r in tables["sender-storage-contexts"]}
    listener_classes = {r["SOP Class UID"] for r in tables["listener-sop-classes"]}
    for key, r in rows.items():
        ds = pydicom.dcmread(outcome.files[key])
        assert ds.SOPClassUID == r["SOP Class UID"] == expected_class[key], key
        assert r["SOP Class"] == UID(r["SOP Class UID"]).name
        assert ds.Modality == r["Modality"], key
        assert int(ds.SeriesNumber) == int(r["Series Number"]), key
        assert ds.SeriesDescription == r["Series Description"], key
        assert ds.file_meta.TransferSyntaxUID == r["Transfer Syntax UID"], key
        assert ds.file_meta.ImplementationClassUID == r["Implementation Class UID"], key
        assert ds.file_meta.ImplementationVersionName == r["Implementation Version Name"], key
        charset = ds.get("SpecificCharacterSet")
        if r["Specific Character Set"] == "as source":
            assert charset == source.get("SpecificCharacterSet"), key
        else:
            assert charset == r["Specific Character Set"], key
        assert r["SOP Class UID"] in sender_classes and r["SOP Class UID"] in listener_classes


@pytest.mark.parametrize("key", ["report_sc", "seg", "sr"])
def test_module_tables_list_what_the_objects_carry(tables, created, key):
    outcome, _ = created
    ds = pydicom.dcmread(outcome.files[key])
    present = {e.keyword for e in ds}
    documented, required = set(), set()
    for r in tables[f"iod-{key}"]:
        cell = r["Attributes written"]
        if cell.startswith("("):  # "(all Type 3; none written)"
            continue
        for word in (w.strip() for w in cell.split(",")):
            keyword = word.rstrip("*")
            assert pydicom.datadict.tag_for_keyword(keyword) is not None, f"{key}: {word!r} is no DICOM keyword"
            documented.add(keyword)
            if not word.endswith("*"):
                required.add(keyword)
    assert not required - present, f"{key}: documented but not written: {sorted(required - present)}"
    assert not present - documented, f"{key}: written but not documented: {sorted(present - documented)}"


# ----------------------------------------------------------------------------------------------
# Source layouts (A.7)


def test_every_documented_source_layout_reads_as_its_classic_twin(tables, tmp_path):
    """Each row of Table A.7-1: the emulator writes the layout with the documented keywords, the
    default selection rules take it and load_series gives the classic twin's array and affine."""
    import json

    import numpy as np
    import pydicom

    from hippo.dicom.ingest import scan_study, select_series
    from hippo.dicom.volume import load_series
    from hippo.scanner import StudyInfo, write_series

    rows = tables["source-layouts"]
    assert len(rows) >= 9
    vol = np.random.default_rng(7).integers(0, 900, (9, 11, 12)).astype(np.uint16)
    aff = np.diag([0.9, 1.0, 1.3, 1.0])
    classic = load_series(write_series(vol, aff, tmp_path / "twin", study=StudyInfo(seed=2)))
    uids = {"Enhanced MR Image Storage": pydicom.uid.EnhancedMRImageStorage,
            "Legacy Converted Enhanced MR Image Storage": pydicom.uid.LegacyConvertedEnhancedMRImageStorage,
            "MR Image Storage": pydicom.uid.MRImageStorage}
    for k, row in enumerate(rows):
        kw = json.loads(row["Emulator"].strip("`"))
        folder = tmp_path / f"layout{k}"
        paths = write_series(vol, aff, folder, study=StudyInfo(seed=2), **kw)
        assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths} == \
            {uids[row["SOP Class"]]}, row["Layout"]
        if row["Instances per series"] == "1":
            assert len(paths) == 1, row["Layout"]
        series = select_series(scan_study(folder))
        sv = load_series(series.files)
        np.testing.assert_array_equal(sv.array, classic.array, err_msg=row["Layout"])
        np.testing.assert_allclose(sv.affine, classic.affine, atol=1e-6, err_msg=row["Layout"])
