"""The machine-readable results: a DICOM Segmentation (SEG) and a TID 1500 measurement report (SR).

highdicom + pydicom + numpy only (no torch).

* :func:`make_seg` — a BINARY Segmentation with two segments, "Anterior hippocampus" (1) and
  "Posterior hippocampus" (2), SNOMED CT Anatomical Structure / Hippocampus (5366008) with an
  Anterior / Posterior type modifier, algorithm type AUTOMATIC with its Algorithm Identification
  (family: Artificial Intelligence). One frame per segment per source slice (``omit_empty_frames
  =False``), pixel-aligned with the source, uncompressed Explicit VR Little Endian: what viewers
  (OHIF) place most reliably.
* :func:`make_sr` — a Comprehensive 3D SR holding a TID 1500 Measurement Report: one volumetric
  ROI measurement group (TID 1411) per segment, referencing the SEG segment, with its Volume in mm³
  (UCUM ``mm3``), and one measurement group (TID 1501) with the total volume. The SEG and the
  source images are passed as evidence.

Both are flagged as research results: SeriesDescription says "research use" and
ContentQualification is RESEARCH.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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
            ``source_datasets[i]`` -- or one multi-frame (enhanced) instance: frame ``i`` of
            ``mask_frames`` belongs to its frame ``i`` in the file's order.
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
    frames = np.asarray(mask_frames)
    n_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
    expected = (n_frames, int(sources[0].Rows), int(sources[0].Columns))
    if frames.shape != expected:
        raise ValueError(f"mask_frames shape {frames.shape} does not match the sources "
                         f"(n_slices, Rows, Columns) = {expected}")
    frames = validate_mask(frames)

    algorithm = _algorithm_identification(model_version)
    descriptions = []
    for number, (label, modifier, rgb) in SEGMENTS.items():
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
        # which part of the hippocampus: a modifier of the property type, nested in its code item
        # (PS3.3 C.8.20.2, Segmented Property Type Code Sequence)
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(modifier)]
        descriptions.append(desc)

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
        omit_empty_frames=False,
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
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_device_uid(model_version), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
                model_name=ALGORITHM_NAME),
        ),
    )

    def volume(value_mm3: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=VOLUME, value=float(value_mm3), unit=MM3, algorithm_id=algorithm)

    groups: list = []
    for number, value in ((1, volumes.anterior_mm3), (2, volumes.posterior_mm3)):
        label, modifier, _ = SEGMENTS[number]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            # the SEG segment's tracking UID, so that SEG segment and SR group name the same finding
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(segment_items[number].get("TrackingUID", "")) or generate_uid(), identifier=label),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number),
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
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.LN.BrainMRI,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
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
