"""The machine-readable results: a DICOM Segmentation (SEG) and a TID 1500 measurement report (SR).

highdicom + pydicom + numpy only (no torch).

* Sources: a classic series, or enhanced instances in any layout (one or several multi-frame
  instances, single-frame enhanced instances; pixel measures and orientation shared or per frame):
  highdicom is given single-frame stand-ins of the frames and the SEG then references the real
  instances and frames (:func:`_segmentation`).
* :func:`make_seg` — a BINARY Segmentation with two segments, "Anterior hippocampus" (1) and
  "Posterior hippocampus" (2), SNOMED CT Anatomical Structure / Hippocampus (5366008) with an
  Anterior / Posterior type modifier, algorithm type AUTOMATIC with its Algorithm Identification
  (family: Artificial Intelligence). One frame per segment per source slice (``omit_empty_frames
  =False``), pixel-aligned with the source, uncompressed Explicit VR Little Endian: what viewers
  (OHIF) place most reliably. (:func:`make_wholehead_seg` of a classic series keeps only the frames
  with pixels: four segments over ~200 slices of a head, nearly all empty.)
* :func:`make_sr` — a Comprehensive 3D SR holding a TID 1500 Measurement Report: one volumetric
  ROI measurement group (TID 1411) per segment, referencing the SEG segment, with its Volume in mm³
  (UCUM ``mm3``), and one measurement group (TID 1501) with the total volume. The SEG and the
  source images are passed as evidence.

Both are flagged as research results: SeriesDescription says "research use" and
ContentQualification is RESEARCH.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hippo.dicom.ingest import frame_attributes, has_functional_groups
from hippo.measure import Volumes, validate_mask

SEG_SERIES_NUMBER = 9002
SEG_SERIES_DESCRIPTION = "AI hippocampus segmentation, research use"
SR_SERIES_NUMBER = 9003
SR_SERIES_DESCRIPTION = "AI hippocampus volumes (TID 1500), research use"
ALGORITHM_NAME = "HippoVolume UNet"
MANUFACTURER = "HippoVolume"

HIPPOCAMPUS = codes.SCT.Hippocampus  # SCT 5366008
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # SCT 91723000 (CID 7150)
VOLUME = codes.SCT.Volume  # SCT 118565006
MM3 = codes.UCUM.CubicMillimeter  # UCUM "mm3"

#: segment number -> (label, SNOMED topographical modifier, display colour RGB)
SEGMENTS = {
    1: ("Anterior hippocampus", codes.SCT.Anterior, (255, 140, 0)),
    2: ("Posterior hippocampus", codes.SCT.Posterior, (0, 200, 255)),
}


def _algorithm_identification(model_version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=str(model_version))


def _check_sources(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    sources = list(source_datasets)
    if not sources:
        raise ValueError("no source images")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        for ds in sources:
            if not str(ds.get(key, "") or ""):
                raise ValueError(f"{_name(ds)}: the Type 1 attribute {key} is missing or empty; the SEG and SR "
                                 "need it to place the segmentation on the source images")
        values = {str(ds.get(key)) for ds in sources}
        if len(values) != 1:
            raise ValueError(f"source images must share one {key}, got {sorted(values)[:3]}")
    return sources


def _name(ds: Dataset) -> str:
    """The file a source dataset was read from, else its SOP Instance UID."""
    filename = getattr(ds, "filename", None)
    return str(filename) if filename else f"instance {ds.get('SOPInstanceUID', '?')}"


def make_seg(
    source_datasets: Sequence[Dataset],
    mask_frames: np.ndarray,
    *,
    model_version: str,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = SEG_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    device_serial_number: str = "1",
) -> hd.seg.Segmentation:
    """A BINARY DICOM Segmentation of the anterior (1) and posterior (2) hippocampus.

    Args:
        source_datasets: the source MR instances (one series and frame of reference): one per
            slice, sorted along the slice normal -- frame ``i`` of ``mask_frames`` belongs to
            ``source_datasets[i]`` -- or enhanced instances (one or several, multi-frame or
            single-frame, functional groups shared or per frame): ``mask_frames`` holds the frames
            of ``source_datasets[0]`` in the file's order, then those of ``source_datasets[1]``,
            ... (``SeriesVolume.to_source``). The SEG references each instance and frame.
        mask_frames: ``(n_frames, Rows, Columns)`` labels in ``{0, 1, 2}``, pixel-aligned with the
            sources (what ``SeriesVolume.to_source(mask)`` returns).
        model_version: recorded in the Algorithm Identification and SoftwareVersions.
        series_number, series_description: of the new series (defaults per the deploy contract).
        series_instance_uid, sop_instance_uid: generated when not given (with a given
            ``sop_instance_uid`` the segments' tracking UIDs are derived from it, so that making the
            same SEG again gives the same object identities).

    Returns:
        The :class:`highdicom.seg.Segmentation` (a pydicom Dataset; ``.save_as(path)`` writes it).

    Raises:
        ValueError: shape mismatch with the sources, labels outside ``{0, 1, 2}``, or sources from
        more than one series / frame of reference.
    """
    sources = _check_sources(source_datasets)
    frames = validate_mask(_aligned_frames(sources, mask_frames))

    algorithm = _algorithm_identification(model_version)
    descriptions = [_segment_description(number, label, [modifier], rgb, algorithm, sop_instance_uid)
                    for number, (label, modifier, rgb) in SEGMENTS.items()]
    return _segmentation(sources, frames, descriptions, model_version=model_version,
                         series_number=series_number, series_description=series_description,
                         series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
                         device_serial_number=device_serial_number)


def _aligned_frames(sources: list[Dataset], mask_frames: np.ndarray) -> np.ndarray:
    """``mask_frames`` as an array, checked to be ``(n_frames, Rows, Columns)`` of the sources."""
    frames = np.asarray(mask_frames)
    n_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
    expected = (n_frames, int(sources[0].Rows), int(sources[0].Columns))
    if frames.shape != expected:
        raise ValueError(f"mask_frames shape {frames.shape} does not match the sources "
                         f"(n_slices, Rows, Columns) = {expected}")
    return frames


def _segment_description(number: int, label: str, modifiers: Sequence, rgb: tuple[int, int, int],
                         algorithm: hd.AlgorithmIdentificationSequence,
                         sop_instance_uid: str | None) -> hd.seg.SegmentDescription:
    """One automatic hippocampus segment; ``modifiers`` (codes: part, laterality) qualify the
    property type."""
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=HIPPOCAMPUS,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        # fixed with the SOP Instance UID: the same SEG made again names its findings the same
        tracking_uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", label])
        if sop_instance_uid else generate_uid(),
        tracking_id=label,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    # which part (and side) of the hippocampus: modifiers of the property type, nested in its code
    # item (PS3.3 C.8.20.2, Segmented Property Type Code Sequence; laterality: CID 244)
    desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
        hd.sr.CodedConcept.from_code(m) for m in modifiers]
    return desc


def _segmentation(sources: list[Dataset], frames: np.ndarray, descriptions: list, *, model_version: str,
                  series_number: int, series_description: str, series_instance_uid: str | None,
                  sop_instance_uid: str | None, device_serial_number: str,
                  omit_empty_frames: bool = False) -> hd.seg.Segmentation:
    """The BINARY, pixel-aligned, uncompressed SEG of ``frames`` (labels = segment numbers).

    Enhanced sources (one or several instances, functional groups shared or per frame) are given
    to highdicom as one single-frame stand-in per source frame (the frame's geometry at the top
    level, sorted along the normal): highdicom takes one multi-frame source at most and reads its
    pixel measures and orientation from the shared groups only. The stand-ins' references are then
    replaced by the real instance and frame (:func:`_point_to_real_sources`)."""
    stand_ins = _frame_stand_ins(sources) if any(has_functional_groups(ds) for ds in sources) else None
    if stand_ins is not None:
        order, images, real = stand_ins
        seg = _highdicom_segmentation(images, frames[order], descriptions, model_version=model_version,
                                      series_number=series_number, series_description=series_description,
                                      series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
                                      device_serial_number=device_serial_number, omit_empty_frames=omit_empty_frames)
        _point_to_real_sources(seg, real, sources)
        return seg
    return _highdicom_segmentation(sources, frames, descriptions, model_version=model_version,
                                   series_number=series_number, series_description=series_description,
                                   series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
                                   device_serial_number=device_serial_number, omit_empty_frames=omit_empty_frames)


#: Top-level attributes of an enhanced instance left out of its frames' stand-ins (the frame's own
#: geometry replaces them; the rest is pixel data and multi-frame structure).
_NOT_IN_STAND_IN = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "PerFrameFunctionalGroupsSequence",
                    "SharedFunctionalGroupsSequence", "NumberOfFrames", "DimensionIndexSequence",
                    "DimensionOrganizationSequence", "SOPClassUID", "SOPInstanceUID", "ImageType",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "SpacingBetweenSlices")


def _frame_stand_ins(sources: list[Dataset]) -> tuple[np.ndarray, list[Dataset], dict[str, tuple[Dataset, int | None]]]:
    """Single-frame MR stand-ins for every frame of ``sources`` (enhanced instances, or classic
    single-frame ones among them), in slice order along the normal.

    Returns ``(order, stand_ins, real)``: ``order[i]`` is the index, in the concatenated frames of
    ``sources``, of stand-in ``i``; ``real`` maps a stand-in's SOPInstanceUID to ``(source dataset,
    1-based frame number or None)``.

    Raises:
        ValueError: a frame without position, orientation or pixel spacing (names the file and frame).
    """
    from pydicom.uid import MRImageStorage

    entries = []  # (source, frame number or None, geometry dict)
    for ds in sources:
        if has_functional_groups(ds):
            for k, values in enumerate(frame_attributes(ds)):
                entries.append((ds, k + 1, values))
        else:
            entries.append((ds, None, {kw: ds.get(kw) for kw in ("ImagePositionPatient", "ImageOrientationPatient",
                                                                  "PixelSpacing", "SliceThickness",
                                                                  "SpacingBetweenSlices") if ds.get(kw) is not None}))
    for ds, frame, values in entries:
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if values.get(kw) in (None, ""):
                where = f"{_name(ds)} frame {frame}" if frame else _name(ds)
                raise ValueError(f"{where}: no {kw} (neither in the per-frame nor in the shared functional groups); "
                                 "the SEG cannot be placed on the source frames")
    iop = [float(v) for v in entries[0][2]["ImageOrientationPatient"]]
    spacing = [float(v) for v in entries[0][2]["PixelSpacing"]]
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([[float(v) for v in values["ImagePositionPatient"]] for _, _, values in entries])
    order = np.argsort(positions @ normal, kind="stable")
    steps = np.diff(np.sort(positions @ normal))
    step = float(np.median(steps)) if len(steps) else 1.0
    bases: dict[int, Dataset] = {}
    stand_ins, real = [], {}
    for index in order:
        ds, frame, values = entries[index]
        base = bases.get(id(ds))
        if base is None:
            base = bases[id(ds)] = Dataset()
            for elem in ds:
                if elem.keyword not in _NOT_IN_STAND_IN and elem.tag.group != 0x0002:
                    base.add(elem)
        image = Dataset()
        for elem in base:
            image.add(elem)
        image.SOPClassUID = MRImageStorage
        image.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(frame), "stand-in"])
        image.ImageType = list(ds.get("ImageType") or ["ORIGINAL", "PRIMARY"])[:2]
        image.ImagePositionPatient = list(values["ImagePositionPatient"])
        image.ImageOrientationPatient = iop  # one orientation (load_series checked they agree)
        image.PixelSpacing = spacing
        thickness = values.get("SliceThickness") or ds.get("SliceThickness")
        image.SliceThickness = float(thickness) if thickness not in (None, "") else abs(step)
        if values.get("SpacingBetweenSlices") not in (None, ""):
            image.SpacingBetweenSlices = values["SpacingBetweenSlices"]
        stand_ins.append(image)
        real[str(image.SOPInstanceUID)] = (ds, frame)
    return order, stand_ins, real


def _point_to_real_sources(seg: Dataset, real: Mapping[str, tuple[Dataset, int | None]],
                           sources: list[Dataset]) -> None:
    """Replace every reference to a stand-in (:func:`_frame_stand_ins`) in ``seg`` by its real
    instance and frame: the per-frame Derivation Image Source Image items name the instance and its
    ReferencedFrameNumber; the Source Image Sequence and the Referenced Series Sequence (Common
    Instance Reference) list each real instance once."""

    def fix(item: Dataset) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for sub in elem.value:
                    fix(sub)
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid in real:
            ds, frame = real[uid]
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            if frame is not None:
                item.ReferencedFrameNumber = frame

    for item in seg.PerFrameFunctionalGroupsSequence:
        fix(item)

    def instance_items() -> list[Dataset]:
        out = []
        for ds in sources:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            out.append(ref)
        return out

    seg.SourceImageSequence = instance_items()
    for series in seg.get("ReferencedSeriesSequence") or []:
        series.ReferencedInstanceSequence = instance_items()


def _referenced_segments(seg: Dataset, numbers: Sequence[int]) -> dict[int, hd.sr.ReferencedSegment]:
    """The SR's reference to each segment in ``numbers`` of ``seg`` with every source image (and
    frame) its frames were derived from: one item per source instance, all its frames listed
    (highdicom's ``from_segmentation`` keeps one frame per instance), as ``from_segmentation`` lists
    them for single-frame sources. One pass over the SEG's per-frame groups for all segments."""
    wanted = {int(n) for n in numbers}
    items = seg.PerFrameFunctionalGroupsSequence

    def collect(segments: set[int]) -> dict[int, dict[str, tuple[str, set[int]]]]:
        found: dict[int, dict[str, tuple[str, set[int]]]] = {n: {} for n in segments}
        for item in items:
            per_source = found.get(int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
            if per_source is None:
                continue
            for derivation in item.get("DerivationImageSequence") or []:
                for src in derivation.get("SourceImageSequence") or []:
                    uid = str(src.ReferencedSOPInstanceUID)
                    entry = per_source.get(uid)
                    if entry is None:
                        entry = per_source[uid] = (str(src.ReferencedSOPClassUID), set())
                    value = src.get("ReferencedFrameNumber")
                    if value is not None:
                        entry[1].update(int(v) for v in (value if isinstance(value, (list, MultiValue)) else [value]))
        return found

    found = collect(wanted)
    out = {}
    for number in sorted(wanted):
        per_source = found[number]
        if not per_source:  # no frame (an empty segment of a SEG without empty frames) or no Derivation
            # Image Sequence: every instance of the Referenced Series (highdicom's from_segmentation, method B)
            per_source = {str(ref.ReferencedSOPInstanceUID): (str(ref.ReferencedSOPClassUID), set())
                          for series in seg.get("ReferencedSeriesSequence") or []
                          for ref in series.get("ReferencedInstanceSequence") or []}
        if not per_source:
            out[number] = hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
            continue
        images = [hd.sr.SourceImageForSegmentation(referenced_sop_class_uid=cls, referenced_sop_instance_uid=uid,
                                                   referenced_frame_numbers=sorted(f) or None)
                  for uid, (cls, f) in per_source.items()]
        out[number] = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                              segment_number=number, source_images=images)
    return out


def _series_referenced_segments(seg: Dataset, numbers: Sequence[int], series_uid: str
                                 ) -> dict[int, hd.sr.ReferencedSegment]:
    """The SR's reference to each segment in ``numbers`` of ``seg`` with its source series (TID 1411
    "Source series for segmentation"): the SEG's own per-frame Derivation Image Sequence names the
    source image (and frame) of every frame, so the SR need not repeat them one by one. On a
    188-slice head the per-image form (one item per source image a segment lies on, 95 in all) made
    highdicom's SR about twice as slow to build and 1.5x to write, for nothing a reader cannot get
    from the SEG it references."""
    source = hd.sr.SourceSeriesForSegmentation(str(series_uid))
    return {int(n): hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                            segment_number=int(n), source_series=source)
            for n in numbers}


def _highdicom_segmentation(sources: list[Dataset], frames: np.ndarray, descriptions: list, *, model_version: str,
                            series_number: int, series_description: str, series_instance_uid: str | None,
                            sop_instance_uid: str | None, device_serial_number: str,
                            omit_empty_frames: bool = False) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=str(model_version),
        device_serial_number=device_serial_number,
        omit_empty_frames=omit_empty_frames,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description,
        content_label="HIPPOCAMPUS",
        content_description="AI hippocampus segmentation, research use",
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )


def _device_uid(model_version: str) -> str:
    """A stable UID for the algorithm as an SR observer device (same model version, same UID)."""
    return generate_uid(entropy_srcs=[ALGORITHM_NAME, str(model_version)])


def make_sr(
    source_datasets: Sequence[Dataset],
    seg: Dataset,
    volumes: Volumes,
    *,
    model_version: str,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = SR_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    prior_comparison: Mapping[str, Any] | None = None,
    quality: Mapping[str, Any] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR (TID 1500 Measurement Report) with the hippocampal volumes in mm³.

    Content: per segment of ``seg`` (1 anterior, 2 posterior) a volumetric ROI measurement group
    (TID 1411) that references the segment and holds its Volume (SCT 118565006) in ``mm3``; and a
    measurement group (TID 1501, tracking id "Total hippocampus") with the total volume. Observer:
    the algorithm as a device. Evidence: ``seg`` and the source images.

    Args:
        source_datasets: the source MR instances the SEG was made from.
        seg: the Segmentation from :func:`make_seg` (or one read back from a file).
        volumes: the volumes to record (:func:`hippo.measure.measure_volumes`).
        model_version: recorded in the Algorithm Identification.
        prior_comparison: :func:`hippo.prior.prior_comparison`'s block; when available, groups with
            the change since the prior study follow (:func:`prior_comparison_groups`).
        quality: :meth:`hippo.quality.QualityAssessment.as_dict`; when given, a group with the
            segmentation quality score and flag follows (:func:`quality_group`).

    Raises:
        ValueError: ``seg`` lacks segment 1 or 2, or belongs to another study than the sources.
    """
    sources = _check_sources(source_datasets)
    if str(seg.StudyInstanceUID) != str(sources[0].StudyInstanceUID):
        raise ValueError("the SEG belongs to another study than the source images")
    segment_items = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    numbers = set(segment_items)
    if not set(SEGMENTS) <= numbers:
        raise ValueError(f"the SEG must hold segments {sorted(SEGMENTS)}, has {sorted(numbers)}")

    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=str(model_version))

    def volume(value_mm3: float) -> hd.sr.Measurement:
        return _volume_measurement(value_mm3, algorithm)

    groups: list = []
    references = _referenced_segments(seg, [1, 2])
    for number, value in ((1, volumes.anterior_mm3), (2, volumes.posterior_mm3)):
        label, modifier, _ = SEGMENTS[number]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            # the SEG segment's tracking UID, so that SEG segment and SR group name the same finding
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(segment_items[number].get("TrackingUID", "")) or generate_uid(), identifier=label),
            referenced_segment=references[number],
            finding_type=HIPPOCAMPUS,
            finding_sites=[hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS, topographical_modifier=modifier)],
            algorithm_id=algorithm,
            measurements=[volume(value)],
        ))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", "total"]) if sop_instance_uid
            else generate_uid(), identifier="Total hippocampus"),
        finding_type=HIPPOCAMPUS,
        finding_sites=[hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS)],
        algorithm_id=algorithm,
        measurements=[volume(volumes.total_mm3)],
    ))
    change_groups = prior_comparison_groups(prior_comparison, algorithm, sop_instance_uid=sop_instance_uid)
    if quality is not None:
        groups.append(quality_group(quality, algorithm, sop_instance_uid=sop_instance_uid))
    return _measurement_report_sr([seg, *sources], groups, change_groups=change_groups, model_version=model_version,
                                  series_number=series_number, series_description=series_description,
                                  series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid)


QUALITY_TRACKING_ID = "Segmentation quality"
QUALITY_SCORE = codes.DCM.AnalysisQualityRating  # DCM 111693
QUALITY_ASSESSMENT = codes.DCM.QualityAssessment  # DCM 111050
QUALITY_MET = codes.DCM.UsableMeetsTheQualityControlStandard  # DCM 111237
QUALITY_NOT_MET = codes.DCM.UsableDoesNotMeetTheQualityControlStandard  # DCM 111236
QUALITY_ISSUE = codes.DCM.QualityIssue  # DCM 113010
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1"


def quality_group(quality: Mapping[str, Any], algorithm: hd.sr.AlgorithmIdentification, *,
                  sop_instance_uid: str | None = None, side: str | None = None
                  ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 measurement group "Segmentation quality" (:mod:`hippo.quality`).

    Content: the score as Analysis Quality Rating (DCM 111693, unit ``1``, 0-1; left out when the
    model has one network and no score), the flag as a Quality Assessment (DCM 111050) qualitative
    evaluation -- "Usable - Meets the quality control standard" (DCM 111237) or "Usable - Does not
    meet the quality control standard" (DCM 111236) -- and one Quality Issue (DCM 113010) TEXT item
    per reason to review.

    Args:
        quality: ``score`` (float or None), ``flagged`` (bool), ``reasons`` (list of str).
        algorithm: the Algorithm Identification of the measurements.
        sop_instance_uid: the SR's UID, from which the group's tracking UID is derived (stable).
        side: ``"left"`` or ``"right"`` for one side of a whole head: the finding site then carries
            the laterality and the tracking identifier reads "Segmentation quality, left hippocampus".
    """
    if side not in (None, "left", "right"):
        raise ValueError(f"side must be 'left', 'right' or None, got {side!r}")
    score = quality.get("score")
    key, identifier = ("quality", QUALITY_TRACKING_ID) if side is None else \
        (f"quality-{side}", f"{QUALITY_TRACKING_ID}, {side} hippocampus")
    site = hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS) if side is None else \
        hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS, laterality=LEFT if side == "left" else RIGHT)
    measurements = [] if score is None else [
        hd.sr.Measurement(name=QUALITY_SCORE, value=float(score), unit=NO_UNITS, algorithm_id=algorithm)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", key]) if sop_instance_uid
            else generate_uid(), identifier=identifier),
        finding_type=HIPPOCAMPUS,
        finding_sites=[site],
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=QUALITY_ASSESSMENT, value=QUALITY_NOT_MET if quality.get("flagged") else QUALITY_MET)],
    )
    for reason in quality.get("reasons") or ():
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=QUALITY_ISSUE, value=str(reason)[:1024], relationship_type="CONTAINS"))
    return group


def _volume_measurement(value_mm3: float, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    """A Volume (SCT 118565006) NUM item in mm³."""
    return hd.sr.Measurement(name=VOLUME, value=float(value_mm3), unit=MM3, algorithm_id=algorithm)


def _measurement_report_sr(evidence: list, groups: list, *, model_version: str, series_number: int,
                           series_description: str, series_instance_uid: str | None,
                           sop_instance_uid: str | None, change_groups: list = ()) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR holding a TID 1500 report of ``groups`` then ``change_groups`` (change
    since a prior study, whose private codes the SR then declares), the algorithm as the observer."""
    sr = _measurement_report(evidence, [*groups, *change_groups], model_version=model_version,
                             series_number=series_number, series_description=series_description,
                             series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid)
    if change_groups:
        sr.CodingSchemeIdentificationSequence = [prior_coding_scheme()]
    return sr


def _measurement_report(evidence: list, groups: list, *, model_version: str, series_number: int,
                        series_description: str, series_instance_uid: str | None,
                        sop_instance_uid: str | None) -> hd.sr.Comprehensive3DSR:
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_device_uid(model_version), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
                model_name=ALGORITHM_NAME),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.LN.BrainMRI,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )


REJECTION_SERIES_NUMBER = 9004
REJECTION_SERIES_DESCRIPTION = "AI hippocampus results superseded, research use"


def make_rejection_note(
    rejected: Sequence[Dataset],
    *,
    model_version: str,
    series_number: int = REJECTION_SERIES_NUMBER,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """An IHE IOCM rejection note: a Key Object Selection document titled "Rejected for Quality
    Reasons" (DCM 113001) that lists result objects a newer result of the same study replaces.

    An archive or viewer that implements IOCM hides the listed objects; any other keeps them but can
    tell from the note (and from the newer objects' later series) which result is current.

    Args:
        rejected: the superseded SC, SEG and SR (headers suffice), all of one study.
        model_version: recorded with the observer device.
        series_number, series_instance_uid, sop_instance_uid: of the note (a series of its own).

    Raises:
        ValueError: nothing to reject, or objects of several studies.
    """
    rejected = list(rejected)
    if not rejected:
        raise ValueError("a rejection note needs at least one object to reject")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ValueError(f"rejected objects must belong to one study, got {sorted(studies)}")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(model_version), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
            model_name=ALGORITHM_NAME))
    content = hd.ko.KeyObjectSelection(document_title=codes.DCM.RejectedForQualityReasons,
                                       referenced_objects=rejected, observer_device_context=observer,
                                       description="superseded by a newer result made from more of the study")
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=rejected, content=content,
        series_instance_uid=series_instance_uid or generate_uid(), series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1, manufacturer=MANUFACTURER)
    note.SeriesDescription = REJECTION_SERIES_DESCRIPTION
    return note


# ---------------------------------------------------------------------------------------------------
# Whole-head T1: both hippocampi (four segments with laterality), an SR per side
# ---------------------------------------------------------------------------------------------------
WHOLEHEAD_SEG_SERIES_DESCRIPTION = "AI hippocampus segmentation L/R, research use"
WHOLEHEAD_SR_SERIES_DESCRIPTION = "AI hippocampus volumes L/R (TID 1500), research use"
LEFT, RIGHT = codes.SCT.Left, codes.SCT.Right  # SCT 7771000, 24028007 (CID 244 Laterality)
#: codes of this application (private coding scheme: no standard concept exists for these)
LOCAL_SCHEME = "99HIPPO"
ASYMMETRY_INDEX = hd.sr.CodedConcept("HV001", LOCAL_SCHEME, "Hippocampal asymmetry index")
ETIV = hd.sr.CodedConcept("HV002", LOCAL_SCHEME, "Estimated total intracranial volume")
PERCENT = codes.UCUM.Percent

#: segment number (= label value of :data:`hippo.wholehead.segment.LABELS`) ->
#: (label, part modifier, laterality, display colour RGB)
WHOLEHEAD_SEGMENTS = {
    1: ("Left anterior hippocampus", codes.SCT.Anterior, LEFT, (255, 140, 0)),
    2: ("Left posterior hippocampus", codes.SCT.Posterior, LEFT, (0, 200, 255)),
    3: ("Right anterior hippocampus", codes.SCT.Anterior, RIGHT, (255, 60, 120)),
    4: ("Right posterior hippocampus", codes.SCT.Posterior, RIGHT, (60, 220, 90)),
}


def make_wholehead_seg(
    source_datasets: Sequence[Dataset],
    label_frames: np.ndarray,
    *,
    model_version: str,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = WHOLEHEAD_SEG_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    device_serial_number: str = "1",
) -> hd.seg.Segmentation:
    """A BINARY SEG of both hippocampi of a whole-head series: four segments (:data:`WHOLEHEAD_SEGMENTS`),
    each SNOMED Hippocampus with two property-type modifiers, anterior/posterior and the laterality
    (SCT Left 7771000 / Right 24028007). For a classic (single-frame) source series only the frames
    with pixels are stored (``omit_empty_frames``: a hippocampus spans a few dozen of a head's ~200
    slices); every source image is still referenced (Referenced Series Sequence), so readers give
    empty slices back as zeros. Enhanced sources keep a frame per segment per source frame.

    Args:
        source_datasets: the whole-head series' instances (as for :func:`make_seg`).
        label_frames: ``(n_frames, Rows, Columns)`` labels in ``{0, 1, 2, 3, 4}`` (1/2 left
            anterior/posterior, 3/4 right), pixel-aligned with the sources
            (``SeriesVolume.to_source(result.labels)``).
        model_version, series_number, series_description, series_instance_uid, sop_instance_uid,
        device_serial_number: as for :func:`make_seg`.

    Raises:
        ValueError: shape mismatch, labels outside ``{0..4}``, sources of several series.
    """
    sources = _check_sources(source_datasets)
    frames = _aligned_frames(sources, label_frames)
    if frames.size and (not np.array_equal(frames, np.round(frames)) or frames.min() < 0
                        or frames.max() > max(WHOLEHEAD_SEGMENTS)):
        raise ValueError(f"whole-head labels must be integers in 0..{max(WHOLEHEAD_SEGMENTS)}, got values "
                         f"{np.unique(frames)[:8].tolist()}")
    algorithm = _algorithm_identification(model_version)
    descriptions = [_segment_description(n, label, [part, side], rgb, algorithm, sop_instance_uid)
                    for n, (label, part, side, rgb) in WHOLEHEAD_SEGMENTS.items()]
    # classic sources: only the frames with pixels (a frame per segment per slice is ~10x more frames,
    # nearly all empty, whose functional groups dominate the time to build and write the SEG); readers
    # index those by instance and get zeros for a referenced instance without a frame. Enhanced
    # sources keep every frame: frame-indexed reads (highdicom's get_pixels_by_source_frame) refuse
    # source frames the SEG has no frame for unless told they are empty.
    sparse = not any(has_functional_groups(ds) for ds in sources)
    return _segmentation(sources, frames.astype(np.uint8), descriptions, model_version=model_version,
                         series_number=series_number, series_description=series_description,
                         series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
                         device_serial_number=device_serial_number, omit_empty_frames=sparse)


def make_wholehead_sr(
    source_datasets: Sequence[Dataset],
    seg: Dataset,
    volumes: dict[str, Volumes],
    *,
    asymmetry_index_percent: float | None,
    etiv_mm3: float | None,
    model_version: str,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = WHOLEHEAD_SR_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    quality: Mapping[str, Mapping[str, Any] | None] | None = None,
    change: Mapping[str, Any] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 SR of both hippocampi: per segment of :func:`make_wholehead_seg` a volumetric ROI
    group (TID 1411) referencing the segment and its source series (the SEG names each frame's
    source image; every source image is the SR's evidence), whose finding site carries the
    laterality and the part; per side a group (TID 1501) with the total volume (finding site with
    laterality); one group with the asymmetry index (%, ``100 (L - R) / mean``) and the eTIV (mm³)
    when known.

    Args:
        volumes: ``{"left": Volumes, "right": Volumes}`` (mm³).
        asymmetry_index_percent, etiv_mm3: ``None`` leaves the item out.
        quality: ``{"left": QualityAssessment.as_dict(), "right": ...}`` (``WholeHeadResult.as_dict()``'s
            ``quality``); per side given, a "Segmentation quality" group with laterality follows
            (:func:`quality_group`).

    Raises:
        ValueError: ``seg`` lacks one of segments 1-4, belongs to another study, or a side is missing.
    """
    sources = _check_sources(source_datasets)
    if str(seg.StudyInstanceUID) != str(sources[0].StudyInstanceUID):
        raise ValueError("the SEG belongs to another study than the source images")
    segment_items = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    if not set(WHOLEHEAD_SEGMENTS) <= set(segment_items):
        raise ValueError(f"the SEG must hold segments {sorted(WHOLEHEAD_SEGMENTS)}, has {sorted(segment_items)}")
    if set(volumes) != {"left", "right"}:
        raise ValueError(f"volumes must hold 'left' and 'right', got {sorted(volumes)}")
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=str(model_version))

    def tracking(key: str, label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", key])
                                        if sop_instance_uid else generate_uid(), identifier=label)

    groups: list = []
    # each segment references the SEG and its source series (the SEG names each frame's source image)
    references = _series_referenced_segments(seg, list(WHOLEHEAD_SEGMENTS), str(sources[0].SeriesInstanceUID))
    for number, (label, part, side, _) in WHOLEHEAD_SEGMENTS.items():
        v = volumes["left" if side == LEFT else "right"]
        value = v.anterior_mm3 if part == codes.SCT.Anterior else v.posterior_mm3
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(segment_items[number].get("TrackingUID", "")) or generate_uid(), identifier=label),
            referenced_segment=references[number],
            finding_type=HIPPOCAMPUS,
            finding_sites=[hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS, laterality=side, topographical_modifier=part)],
            algorithm_id=algorithm,
            measurements=[_volume_measurement(value, algorithm)],
        ))
    for name, side in (("left", LEFT), ("right", RIGHT)):
        label = f"{name.capitalize()} hippocampus"
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(f"total-{name}", label), finding_type=HIPPOCAMPUS,
            finding_sites=[hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS, laterality=side)],
            algorithm_id=algorithm, measurements=[_volume_measurement(volumes[name].total_mm3, algorithm)]))
    extra = []
    if asymmetry_index_percent is not None:
        extra.append(hd.sr.Measurement(name=ASYMMETRY_INDEX, value=float(asymmetry_index_percent), unit=PERCENT,
                                       algorithm_id=algorithm))
    if etiv_mm3 is not None:
        extra.append(hd.sr.Measurement(name=ETIV, value=float(etiv_mm3), unit=MM3, algorithm_id=algorithm))
    if extra:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("whole-head", "Both hippocampi and head"), finding_type=HIPPOCAMPUS,
            algorithm_id=algorithm, measurements=extra))
    for name in ("left", "right"):
        if quality and quality.get(name) is not None:
            groups.append(quality_group(quality[name], algorithm, sop_instance_uid=sop_instance_uid, side=name))
    change_groups = wholehead_change_groups(change, algorithm, sop_instance_uid=sop_instance_uid)
    return _measurement_report_sr([seg, *sources], groups, change_groups=change_groups, model_version=model_version,
                                  series_number=series_number, series_description=series_description,
                                  series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid)


# ---------------------------------------------------------------------------------------------------
# Change since the patient's prior study (hippo.prior): extra measurement groups in the SR
# ---------------------------------------------------------------------------------------------------
#: Local codes (private scheme, PS3.3 8.2) for the change items: no standard concept names them.
PRIOR_SCHEME = "99HIPPO"
PRIOR_CODES = {
    "change_mm3": Code("VOLCHG", PRIOR_SCHEME, "Volume change since prior study"),
    "change_percent": Code("VOLCHGPCT", PRIOR_SCHEME, "Percent volume change since prior study"),
    "rate_mm3_per_year": Code("VOLRATE", PRIOR_SCHEME, "Annualised volume change since prior study"),
    "rate_percent_per_year": Code("VOLRATEPCT", PRIOR_SCHEME, "Annualised percent volume change since prior study"),
    "prior_date": Code("PRIORDATE", PRIOR_SCHEME, "Prior study date"),
    "comparability": Code("PRIORNOTE", PRIOR_SCHEME, "Comparability with prior study"),
}
PRIOR_UNITS = {
    "change_mm3": MM3,
    "change_percent": Code("%", "UCUM", "percent"),
    "rate_mm3_per_year": Code("mm3/a", "UCUM", "cubic millimeter per year"),
    "rate_percent_per_year": Code("%/a", "UCUM", "percent per year"),
}
def prior_coding_scheme() -> Dataset:
    """The Coding Scheme Identification item that declares :data:`PRIOR_SCHEME` (PS3.3 C.12.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIOR_SCHEME
    item.CodingSchemeName = "HippoVolume local codes for the change since a prior study"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


#: ``change`` block key -> (tracking identifier, topographical modifier or None)
PRIOR_GROUPS = {
    "anterior": ("Change since prior study: anterior hippocampus", codes.SCT.Anterior),
    "posterior": ("Change since prior study: posterior hippocampus", codes.SCT.Posterior),
    "total": ("Change since prior study: total hippocampus", None),
}


def prior_comparison_groups(comparison: Mapping[str, Any] | None, algorithm: hd.sr.AlgorithmIdentification, *,
                            sop_instance_uid: str | None = None) -> list:
    """TID 1501 measurement groups with the change since the prior study, one per structure, or
    ``[]`` when ``comparison`` (:func:`hippo.prior.prior_comparison`'s block) is not available.

    Each group: the change in mm³ and in % of the prior volume, annualised in mm³/a and %/a (items
    whose value is ``None`` are left out), the prior study date (DATE) and a TEXT item saying whether
    the two results are directly comparable (same algorithm name and version) and why not.
    """
    if not comparison or not comparison.get("available"):
        return []
    import datetime as _dt

    prior_date = _dt.date.fromisoformat(str(comparison["prior"]["study_date"]))
    comparable = "directly comparable (same algorithm and version)" if comparison.get("comparable") else \
        str(comparison.get("note") or "not directly comparable")
    groups = []
    for key, (identifier, modifier) in PRIOR_GROUPS.items():
        values = comparison["change"][key]
        measurements = [hd.sr.Measurement(name=PRIOR_CODES[k], value=float(values[k]), unit=PRIOR_UNITS[k],
                                          algorithm_id=algorithm)
                        for k in PRIOR_UNITS if values.get(k) is not None]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", identifier]) if sop_instance_uid
                else generate_uid(), identifier=identifier),
            finding_type=HIPPOCAMPUS,
            finding_sites=[hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS, topographical_modifier=modifier)
                           if modifier is not None else hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS)],
            algorithm_id=algorithm,
            measurements=measurements,
        )
        group[0].ContentSequence.append(hd.sr.DateContentItem(
            name=PRIOR_CODES["prior_date"], value=prior_date, relationship_type="CONTAINS"))
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=PRIOR_CODES["comparability"], value=comparable[:1024], relationship_type="CONTAINS"))
        groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------------
# Whole head: change since an earlier scan, one group per side (hippo.change.wholehead_change's block)
# ---------------------------------------------------------------------------------------------------
WHOLEHEAD_CHANGE_CODES = {
    "mdc95_percent": Code("MDC95PCT", PRIOR_SCHEME, "Minimal detectable change (95 %) of the percent volume change"),
    "statement": Code("RELCHG", PRIOR_SCHEME, "Reliable change statement"),
}


def wholehead_change_groups(change: Mapping[str, Any] | None, algorithm: hd.sr.AlgorithmIdentification, *,
                            sop_instance_uid: str | None = None) -> list:
    """TID 1501 groups "Change since prior study: left/right hippocampus" (finding site Hippocampus
    with laterality), or ``[]`` when ``change`` (:func:`hippo.change.wholehead_change`'s block) is not
    available. Each: the total volume's change in mm³, %, mm³/a and %/a (items without a value left
    out), the minimal detectable change (95 %) of the measurement mode used (%), the prior study date
    (DATE, when known) and a TEXT item with the reliable-change sentence and the mode."""
    import datetime as _dt

    if not change or not change.get("available"):
        return []
    earlier = change.get("earlier_date")
    groups = []
    for name, side in (("left", LEFT), ("right", RIGHT)):
        entry = (change.get("sides") or {}).get(name) or {}
        values = entry.get("total") or {}
        measurements = [hd.sr.Measurement(name=PRIOR_CODES[k], value=float(values[k]), unit=PRIOR_UNITS[k],
                                          algorithm_id=algorithm)
                        for k in PRIOR_UNITS if values.get(k) is not None]
        if entry.get("mdc95_percent") is not None:
            measurements.append(hd.sr.Measurement(name=WHOLEHEAD_CHANGE_CODES["mdc95_percent"],
                                                  value=float(entry["mdc95_percent"]), unit=PRIOR_UNITS["change_percent"],
                                                  algorithm_id=algorithm))
        identifier = f"Change since prior study: {name} hippocampus"
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", identifier]) if sop_instance_uid
                else generate_uid(), identifier=identifier),
            finding_type=HIPPOCAMPUS,
            finding_sites=[hd.sr.FindingSite(anatomic_location=HIPPOCAMPUS, laterality=side)],
            algorithm_id=algorithm,
            measurements=measurements or None,
        )
        if earlier:
            group[0].ContentSequence.append(hd.sr.DateContentItem(
                name=PRIOR_CODES["prior_date"], value=_dt.date.fromisoformat(str(earlier)), relationship_type="CONTAINS"))
        mode = "paired measurement" if change.get("mode") == "paired" else "two independent measurements"
        text = f"{entry.get('statement', '')} ({mode})".replace("\u2212", "-")  # Latin-1 (ISO_IR 100) has no minus sign
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=WHOLEHEAD_CHANGE_CODES["statement"], value=text[:1024], relationship_type="CONTAINS"))
        groups.append(group)
    return groups
