"""OME-XML for the pyramidal OME-TIFF (stored in the ImageDescription of the first IFD only)."""
from __future__ import annotations

from dataclasses import dataclass

from ome_types import model, to_xml

from . import __version__
from .mosaic import MosaicMetadata

INSTRUMENT_ID = "Instrument:0"
OBJECTIVE_ID = "Objective:0:0"
EXPERIMENTER_ID = "Experimenter:0"


@dataclass(frozen=True)
class OmeSeries:
    """One OME Image: its name, full-resolution size, pixel size and main-chain IFD index."""
    name: str
    height_px: int
    width_px: int
    pixel_size_um: float
    ifd: int


def build_ome_xml(*, file_name: str, file_uuid: str, metadata: MosaicMetadata, series: list[OmeSeries],
                  experimenter_name: str | None = None) -> str:
    """OME-XML with one Image per series; reduced resolutions live in SubIFDs and are not listed.

    Only the experimenter (when passed) identifies a person; nothing is taken from the host."""
    urn = f"urn:uuid:{file_uuid}"
    instrument = model.Instrument(id=INSTRUMENT_ID, objectives=[model.Objective(
        id=OBJECTIVE_ID, nominal_magnification=metadata.objective_magnification,
        lens_na=metadata.numerical_aperture)])
    experimenters = ([model.Experimenter(id=EXPERIMENTER_ID, user_name=experimenter_name)]
                     if experimenter_name else [])
    images = []
    for index, entry in enumerate(series):
        pixels = model.Pixels(
            id=f"Pixels:{index}", dimension_order="XYCZT", type="uint8", big_endian=False,
            interleaved=True, significant_bits=8,
            size_x=entry.width_px, size_y=entry.height_px, size_c=3, size_z=1, size_t=1,
            physical_size_x=entry.pixel_size_um, physical_size_x_unit="µm",
            physical_size_y=entry.pixel_size_um, physical_size_y_unit="µm",
            channels=[model.Channel(id=f"Channel:{index}:0", name="RGB", samples_per_pixel=3)],
            tiff_data_blocks=[model.TiffData(
                ifd=entry.ifd, plane_count=1, first_c=0, first_z=0, first_t=0,
                uuid=model.TiffData.UUID(file_name=file_name, value=urn))],
        )
        images.append(model.Image(
            id=f"Image:{index}", name=entry.name, acquisition_date=metadata.acquisition_datetime,
            instrument_ref=model.InstrumentRef(id=INSTRUMENT_ID),
            objective_settings=model.ObjectiveSettings(id=OBJECTIVE_ID),
            experimenter_ref=model.ExperimenterRef(id=EXPERIMENTER_ID) if experimenter_name else None,
            pixels=pixels))
    ome = model.OME(uuid=urn, creator=f"wsi_export {__version__}", instruments=[instrument],
                    experimenters=experimenters, images=images)
    return to_xml(ome)
