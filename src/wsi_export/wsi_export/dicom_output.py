"""DICOM WSI output: one series of VL Whole Slide Microscopy Image instances (DICOM PS3.3 A.32.8, the IOD of
Supplement 145) in a directory, one file per instance:

    <name>.dicom/level-0.dcm, level-1.dcm, ...   the pyramid (Image Type VOLUME), full resolution first
    <name>.dicom/thumbnail.dcm                   THUMBNAIL, when the export writes a thumbnail
    <name>.dicom/overview.dcm, label.dcm         OVERVIEW (the scan's macro photo) and LABEL, where given

Every instance is TILED_FULL (PS3.3 C.7.6.17.3): a level's frames are the tiles the export's block jobs
encode, appended to its file in the order they arrive (row by row from the top left), so no level is held
in memory and a tile the OME-TIFF shares is encoded once. The header is written first (pydicom); the three
values known only after the last frame (the Extended Offset Table, its lengths and the lossy compression
ratio) are reserved in it at their final size and filled in at the end.

Identity: the patient and study attributes are present and empty (Type 2 in PS3.3 C.7.1.1 and C.7.2.1) for
the laboratory information system to fill in, so nothing personal is written or invented. Container and
specimen identifiers (Type 1) are the scan id; the only person named is the operator, when the caller
passes one. UIDs are UUID-derived (2.25., PS3.5 B.2), new for every export: study, series, frame of
reference, pyramid and specimen are shared by the instances of one export, each instance has its own."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import ImageCms
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.encaps import itemize_frame
from pydicom.sr.codedict import codes
from pydicom.tag import ItemTag, SequenceDelimiterTag, Tag
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from . import __version__
from .codecs import TileCodec, resolve_codec
from .errors import ExportOptionsError
from .mosaic import MosaicMetadata

# ExportOptions.compression values DICOM WSI can carry; lossless=True stores either as JPEG 2000 reversible.
DICOM_COMPRESSIONS = ("jpeg", "jpeg2000")
# Tile codec -> (Transfer Syntax, Lossy Image Compression Method of PS3.3 C.7.6.1.1.5.1; None: lossless)
TRANSFER_SYNTAXES = {"jpeg": (JPEGBaseline8Bit, "ISO_10918_1"), "jpeg2000": (JPEG2000, "ISO_15444_1"),
                     "jpeg2000-lossless": (JPEG2000Lossless, None)}
# Image Type Value 3 (PS3.3 C.8.12.4.1.1) of the slide photos, by the export's series name
SLIDE_PHOTO_FLAVOURS = {"macro": "OVERVIEW", "label": "LABEL"}
MILLIMETRES_PER_MICROMETRE = 1e-3
# The depth of field below is computed at this wavelength: green, where bright-field stains absorb and the
# eye is most sensitive.
NOMINAL_WAVELENGTH_UM = 0.55
DRY_IMMERSION_INDEX = 1.0
OIL_IMMERSION_INDEX = 1.515
OPTICAL_PATH_ID = "1"
# The Lossy Image Compression Ratio is written once the frames are known, into a value of this fixed length
# (DS values are at most 16 characters; padding spaces are not significant).
RATIO_VALUE_CHARS = 16


@dataclass(frozen=True)
class DicomEquipment:
    """The scanner, for the Enhanced General Equipment Module (PS3.3 C.7.5.2), where every attribute is
    Type 1. A mosaic does not record the device it came from, so each says "UNKNOWN" unless the caller
    knows better; the software version is always this exporter's."""
    manufacturer: str = "UNKNOWN"
    model_name: str = "UNKNOWN"
    device_serial_number: str = "UNKNOWN"


def resolve_dicom_codec(compression: str, quality: int, lossless: bool,
                        jpeg_subsampling: tuple[int, int]) -> TileCodec:
    """The tile codec of the DICOM output for the export's options. JPEG baseline has no lossless mode, so
    lossless=True stores jpeg as JPEG 2000 reversible, the lossless transfer syntax OpenSlide and wsidicom
    both decode (OME-TIFF stores it as deflate, which DICOM has no frame codec for)."""
    if compression not in DICOM_COMPRESSIONS:
        raise ExportOptionsError(f"compression {compression!r} has no DICOM WSI transfer syntax; with format "
                                 f"'dicom' expected one of {DICOM_COMPRESSIONS} (lossless=True for lossless)")
    return resolve_codec("jpeg2000" if lossless else compression, quality, lossless, jpeg_subsampling)


def photometric_interpretation(codec: TileCodec) -> str:
    """What the frames' colour components are (PS3.5 8.2.1 for JPEG, 8.2.4 for JPEG 2000)."""
    if codec.compression == "jpeg":
        return "RGB" if codec.jpeg_colorspace == "RGB" else "YBR_FULL_422"
    # codecs.py encodes JPEG 2000 with the multi-component transform: irreversible (ICT) or reversible (RCT)
    return "YBR_RCT" if codec.is_lossless else "YBR_ICT"


def nominal_depth_of_field_um(numerical_aperture: float) -> float:
    """Wave-optical depth of field n*lambda/NA^2 of the objective, the value PS3.3 C.8.12.4.1.2 allows as
    the imaged depth of a single focal plane. The mosaic records the NA but not the immersion medium, so a
    dry objective (n = 1) is assumed below NA 1 and oil above; the detector term needs the camera and is
    left out (a quarter to a third of the total for the virtual microscope's objectives)."""
    immersion_index = DRY_IMMERSION_INDEX if numerical_aperture < 1.0 else OIL_IMMERSION_INDEX
    return immersion_index * NOMINAL_WAVELENGTH_UM / numerical_aperture ** 2


def _ds(value: float) -> DSfloat:
    return DSfloat(value, auto_format=True)


def _code(concept) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = \
        concept.value, concept.scheme_designator, concept.meaning
    return item


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _srgb_icc_profile() -> bytes:
    """The colour space of the frames' RGB values. The camera pipeline delivers display-referred 8-bit RGB
    and records no profile, so the mosaic is declared sRGB, what viewers assume for untagged images."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@dataclass(frozen=True)
class _Geometry:
    """One instance's pixel matrix and its frames."""
    height_px: int
    width_px: int
    frame_height_px: int
    frame_width_px: int
    pixel_spacing_um: tuple[float, float]  # between rows, between columns

    @property
    def frame_count(self) -> int:
        return -(-self.height_px // self.frame_height_px) * -(-self.width_px // self.frame_width_px)


class DicomSeriesWriter:
    """The instances of one export, written into `directory` (created here, empty). The mosaic is
    full_resolution_shape (height_px, width_px) at metadata.pixel_size_um."""

    def __init__(self, directory: Path, metadata: MosaicMetadata, full_resolution_shape: tuple[int, int],
                 codec: TileCodec, tile_size_px: int, equipment: DicomEquipment, operator_name: str | None):
        directory.mkdir()
        self.directory = directory
        self.metadata = metadata
        self.codec = codec
        self.tile_size_px = tile_size_px
        self._scanned_extent_um = tuple(edge * metadata.pixel_size_um for edge in full_resolution_shape)
        self.equipment = equipment
        self.operator_name = operator_name
        self._study_uid, self._series_uid, self._frame_of_reference_uid, self._pyramid_uid, \
            self._dimension_organization_uid, self._specimen_uid = (generate_uid(prefix=None) for _ in range(6))
        self._icc_profile = _srgb_icc_profile()
        self._instances_written = 0

    def pyramid_level(self, level: int, height_px: int, width_px: int, pixel_size_um: float) -> DicomInstanceFile:
        """The instance of one pyramid level, open for its frames: tiles of tile_size_px, row by row."""
        geometry = _Geometry(height_px, width_px, self.tile_size_px, self.tile_size_px, (pixel_size_um,) * 2)
        image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else \
            ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        return self._open(f"level-{level}.dcm", image_type, geometry)

    def write_thumbnail(self, pixels: np.ndarray) -> None:
        """A small image of the whole pyramid, one frame. It spans the scanned extent, so its spacing is
        that extent over its pixels, per axis: the pyramid's edges need not halve evenly."""
        spacing_um = tuple(extent / edge for extent, edge in zip(self._scanned_extent_um, pixels.shape[:2]))
        self._write_single_frame("thumbnail.dcm", ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"], pixels,
                                 spacing_um)

    def write_slide_photo(self, series_name: str, pixels: np.ndarray, pixel_size_um: float) -> None:
        """The macro or label photo (export series name "macro", "label"), one frame."""
        flavour = SLIDE_PHOTO_FLAVOURS[series_name]
        self._write_single_frame(f"{flavour.lower()}.dcm", ["ORIGINAL", "PRIMARY", flavour, "NONE"], pixels,
                                 (pixel_size_um,) * 2)

    def _write_single_frame(self, file_name: str, image_type: list[str], pixels: np.ndarray,
                            pixel_spacing_um: tuple[float, float]) -> None:
        h, w = pixels.shape[:2]
        with self._open(file_name, image_type, _Geometry(h, w, h, w, pixel_spacing_um)) as file:
            file.write_frame(self.codec.encode(pixels))

    def _open(self, file_name: str, image_type: list[str], geometry: _Geometry) -> DicomInstanceFile:
        self._instances_written += 1
        transfer_syntax, lossy_method = TRANSFER_SYNTAXES[self.codec.compression]
        dataset = self._dataset(image_type, geometry, self._instances_written, lossy_method)
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = transfer_syntax
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        frame_bytes = geometry.frame_height_px * geometry.frame_width_px * 3
        return DicomInstanceFile(self.directory / file_name, dataset, geometry.frame_count, frame_bytes)

    def _dataset(self, image_type: list[str], geometry: _Geometry, instance_number: int,
                 lossy_method: str | None) -> Dataset:
        """The attributes of one instance, module by module (PS3.3 Table A.32.8-1)."""
        metadata, flavour = self.metadata, image_type[2]
        acquired = metadata.acquisition_datetime
        ds = Dataset()
        # SOP Common (C.12.1): UTF-8, as an operator's name may need it
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.SOPInstanceUID = generate_uid(prefix=None)
        # Patient (C.7.1.1) and General Study (C.7.2.1): Type 2 placeholders for the LIS
        ds.PatientName = ds.PatientID = ds.PatientBirthDate = ds.PatientSex = ""
        ds.StudyInstanceUID = self._study_uid
        ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
        # General Series (C.7.3.1), Whole Slide Microscopy Series (C.8.12.3)
        ds.Modality = "SM"
        ds.SeriesInstanceUID = self._series_uid
        ds.SeriesNumber = 1
        if self.operator_name:
            ds.OperatorsName = self.operator_name
        # General and Enhanced General Equipment (C.7.5.1, C.7.5.2)
        ds.Manufacturer = self.equipment.manufacturer
        ds.ManufacturerModelName = self.equipment.model_name
        ds.DeviceSerialNumber = self.equipment.device_serial_number
        ds.SoftwareVersions = f"wsi_export {__version__}"
        # Frame of Reference (C.7.4.1): required for the pyramid and thumbnail, which share the slide
        # coordinate system. The photos are left out of it: where they lie relative to the mosaic is not known.
        if flavour in ("VOLUME", "THUMBNAIL"):
            ds.FrameOfReferenceUID = self._frame_of_reference_uid
            ds.PositionReferenceIndicator = "SLIDE_CORNER"
            # Multi-Resolution Pyramid (C.7.11.1): the levels and thumbnail belong to one pyramid
            ds.PyramidUID = self._pyramid_uid
        # General Image (C.7.6.1), Multi-frame Functional Groups (C.7.6.16)
        ds.ImageType = image_type
        ds.InstanceNumber = instance_number
        ds.ContentDate = acquired.strftime("%Y%m%d")
        ds.ContentTime = acquired.strftime("%H%M%S.%f")
        ds.TimezoneOffsetFromUTC = acquired.strftime("%z")
        ds.NumberOfFrames = geometry.frame_count
        pixel_measures = _item(PixelSpacing=[_ds(spacing * MILLIMETRES_PER_MICROMETRE)
                                             for spacing in geometry.pixel_spacing_um])
        if flavour in ("VOLUME", "THUMBNAIL"):
            pixel_measures.SliceThickness = _ds(nominal_depth_of_field_um(metadata.numerical_aperture)
                                                * MILLIMETRES_PER_MICROMETRE)
        ds.SharedFunctionalGroupsSequence = [_item(
            PixelMeasuresSequence=[pixel_measures],
            WholeSlideMicroscopyImageFrameTypeSequence=[_item(FrameType=image_type)],
            OpticalPathIdentificationSequence=[_item(OpticalPathIdentifier=OPTICAL_PATH_ID)])]
        # Multi-frame Dimension (C.7.6.17): TILED_FULL, so no per-frame positions or dimension index
        ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=self._dimension_organization_uid)]
        ds.DimensionOrganizationType = "TILED_FULL"
        # Image Pixel (C.7.6.3)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = photometric_interpretation(self.codec)
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = geometry.frame_height_px, geometry.frame_width_px
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        # Acquisition Context (C.7.6.14): nothing to say (Type 2)
        ds.AcquisitionContextSequence = []
        # Specimen (C.7.6.22): one slide holding one specimen, both known by the scan id until the LIS says
        ds.ContainerIdentifier = metadata.scan_id
        ds.IssuerOfTheContainerIdentifierSequence = []
        ds.ContainerTypeCodeSequence = [_code(codes.SCT.MicroscopeSlide)]
        ds.SpecimenDescriptionSequence = [_item(
            SpecimenIdentifier=metadata.scan_id, SpecimenUID=self._specimen_uid,
            IssuerOfTheSpecimenIdentifierSequence=[], SpecimenPreparationSequence=[])]
        # Microscope Slide Layer Tile Organization (C.8.12.14). The mosaic does not record where on the
        # slide it lies, so its top left pixel is put at the origin; the columns follow the stage's x, the
        # slide's long edge, which is the slide coordinate system's Y axis (C.8.12.2.1.1), the rows its X.
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = geometry.height_px, geometry.width_px
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.TotalPixelMatrixOriginSequence = [_item(XOffsetInSlideCoordinateSystem=_ds(0.0),
                                                   YOffsetInSlideCoordinateSystem=_ds(0.0))]
        ds.ImageOrientationSlide = [0, 1, 0, 1, 0, 0]
        # Whole Slide Microscopy Image (C.8.12.4)
        if flavour in ("VOLUME", "THUMBNAIL"):
            # each instance's own extent: a level whose pixels halved an odd edge reaches half a pixel further
            ds.ImagedVolumeHeight, ds.ImagedVolumeWidth = (
                edge * spacing * MILLIMETRES_PER_MICROMETRE
                for edge, spacing in zip((geometry.height_px, geometry.width_px), geometry.pixel_spacing_um))
            ds.ImagedVolumeDepth = nominal_depth_of_field_um(metadata.numerical_aperture)
        ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S.%f%z")
        ds.VolumetricProperties = "VOLUME"
        # A macro photo may show the slide label, and the label what identifies the patient: declared so,
        # a de-identification tool treats both as identifying (the manifest does not say what they show).
        shows_label = "YES" if flavour in ("OVERVIEW", "LABEL") else "NO"
        ds.SpecimenLabelInImage = ds.BurnedInAnnotation = shows_label
        # The scan focuses from its focus map (and inline autofocus) without a person
        ds.FocusMethod = "AUTO"
        ds.ExtendedDepthOfField = "NO"
        if lossy_method is None:
            ds.LossyImageCompression = "00"
        else:
            ds.LossyImageCompression = "01"
            # a placeholder of the final length, filled in by DicomInstanceFile (pydicom strips padding spaces)
            ds.LossyImageCompressionRatio = f"{1:.{RATIO_VALUE_CHARS - 2}f}"
            ds.LossyImageCompressionMethod = lossy_method
        # Optical Path (C.8.12.5): bright-field, white light, the objective the mosaic was scanned with
        ds.NumberOfOpticalPaths = 1
        ds.OpticalPathSequence = [_item(
            OpticalPathIdentifier=OPTICAL_PATH_ID,
            IlluminationTypeCodeSequence=[_code(codes.DCM.BrightfieldIllumination)],
            IlluminationColorCodeSequence=[_code(codes.SCT.FullSpectrum)],
            ICCProfile=self._icc_profile,
            ObjectiveLensPower=_ds(metadata.objective_magnification),
            ObjectiveLensNumericalAperture=_ds(metadata.numerical_aperture))]
        # Slide Label (C.8.12.8), required for LABEL: what the label says is in its pixels only
        if flavour == "LABEL":
            ds.BarcodeValue = ds.LabelText = ""
        return ds


class DicomInstanceFile:
    """One instance being written: header first, then frames one by one (write_frame), then the values
    that depend on them (close). Encapsulated Pixel Data as PS3.5 A.4 lays it out: an empty Basic Offset
    Table item, one item per frame, a sequence delimiter; frame offsets go to the Extended Offset Table,
    whose 64-bit offsets also reach past 4 GiB."""

    _DEFERRED = (Tag("ExtendedOffsetTable"), Tag("ExtendedOffsetTableLengths"), Tag("LossyImageCompressionRatio"))

    def __init__(self, path: Path, dataset: Dataset, frame_count: int, frame_bytes: int):
        self.path = path
        self.frame_count = frame_count
        self.frame_bytes = frame_bytes
        self.lossy = dataset.LossyImageCompression == "01"
        dataset.ExtendedOffsetTable = bytes(8 * frame_count)
        dataset.ExtendedOffsetTableLengths = bytes(8 * frame_count)
        self._handle = open(path, "xb")
        try:
            dataset.save_as(self._handle, enforce_file_format=True)
            self._value_offsets = self._deferred_value_offsets()
            self._handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))  # undefined length
            self._handle.write(struct.pack("<HHI", ItemTag.group, ItemTag.element, 0))  # empty Basic Offset Table
        except BaseException:
            self._handle.close()
            raise
        self._first_item_at = self._handle.tell()
        self._offsets: list[int] = []
        self._lengths: list[int] = []

    def _deferred_value_offsets(self) -> dict[int, int]:
        """File offsets of the values filled in by close(), read back from the header just written."""
        self._handle.flush()
        header = dcmread(self.path, stop_before_pixels=True)
        return {tag: header.get_item(tag).value_tell for tag in self._DEFERRED if tag in header}

    def write_frame(self, frame: bytes) -> None:
        if len(self._offsets) == self.frame_count:
            raise ValueError(f"{self.path.name}: frame {self.frame_count + 1} written, expected "
                             f"{self.frame_count} frames")
        self._offsets.append(self._handle.tell() - self._first_item_at)
        self._lengths.append(len(frame) + len(frame) % 2)  # items are padded to an even length
        for item in itemize_frame(frame):
            self._handle.write(item)

    def close(self) -> None:
        """Complete the instance: every frame must have been written."""
        try:
            if len(self._offsets) != self.frame_count:
                raise ValueError(f"{self.path.name}: {len(self._offsets)} frames written, expected "
                                 f"{self.frame_count}")
            self._handle.write(struct.pack("<HHI", SequenceDelimiterTag.group, SequenceDelimiterTag.element, 0))
            values = {Tag("ExtendedOffsetTable"): struct.pack(f"<{self.frame_count}Q", *self._offsets),
                      Tag("ExtendedOffsetTableLengths"): struct.pack(f"<{self.frame_count}Q", *self._lengths)}
            if self.lossy:
                ratio = self.frame_count * self.frame_bytes / sum(self._lengths)
                values[Tag("LossyImageCompressionRatio")] = f"{ratio:.6g}".ljust(RATIO_VALUE_CHARS).encode()
            for tag, value in values.items():
                self._handle.seek(self._value_offsets[tag])
                self._handle.write(value)
        finally:
            self._handle.close()

    def __enter__(self) -> DicomInstanceFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # the export fails; its work directory, this file with it, is removed
            self._handle.close()
