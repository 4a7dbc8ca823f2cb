"""Outputs appear under their final names only when complete; every failure leaves nothing behind."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zarr

from wsi_export import ome_tiff_output
from wsi_export.errors import (ExportCancelled, ExportOptionsError, ExportStorageError,
                               MosaicInputError)
from wsi_export.export import ExportOptions, export_slide
from wsi_export.mosaic import mosaic_from_array


class _FullDisk:
    """A binary file that accepts `capacity` bytes, then fails like a full filesystem."""

    def __init__(self, path, capacity):
        self._file = open(path, "xb")
        self._remaining = capacity

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self._remaining:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._remaining -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_full_disk_raises_storage_error_and_leaves_nothing(mosaic_path, tmp_path, monkeypatch):
    monkeypatch.setattr(ome_tiff_output, "_open_binary_output", lambda path: _FullDisk(path, 200_000))
    with pytest.raises(ExportStorageError, match="No space left") as raised:
        export_slide(mosaic_path, tmp_path, "full", ("ome-tiff", "ome-zarr"))
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("formats", [("ome-tiff",), ("ome-zarr",), ("ome-tiff", "ome-zarr")])
def test_cancel_raises_and_leaves_nothing(mosaic_path, tmp_path, formats):
    polls = []

    def should_cancel():
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(ExportCancelled):
        export_slide(mosaic_path, tmp_path, "cancelled", formats, should_cancel=should_cancel)
    assert list(tmp_path.iterdir()) == []


def test_failing_job_leaves_nothing(mosaic_path, tmp_path, monkeypatch):
    def broken_encode(self, tile):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr("wsi_export.codecs.TileCodec.encode", broken_encode)
    with pytest.raises(ExportStorageError, match="I/O error"):
        export_slide(mosaic_path, tmp_path, "broken")
    assert list(tmp_path.iterdir()) == []


def test_bad_output_directory_is_a_clear_storage_error(mosaic_path, tmp_path):
    with pytest.raises(ExportStorageError, match="does not exist"):
        export_slide(mosaic_path, tmp_path / "missing", "x")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ExportStorageError, match="not a directory"):
        export_slide(mosaic_path, tmp_path / "file", "x")


def test_existing_output_is_kept_unless_overwrite(mosaic_path, tmp_path):
    final = tmp_path / "slide.ome.tif"
    final.write_bytes(b"previous export")
    with pytest.raises(ExportStorageError, match="already exists"):
        export_slide(mosaic_path, tmp_path, "slide", options=ExportOptions(write_thumbnail=False))
    assert final.read_bytes() == b"previous export"
    export_slide(mosaic_path, tmp_path, "slide", ("ome-tiff", "ome-zarr"),
                 options=ExportOptions(write_thumbnail=False, overwrite=True))
    assert final.stat().st_size > 100_000
    export_slide(mosaic_path, tmp_path, "slide", ("ome-zarr",), options=ExportOptions(overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.ome.tif", "slide.ome.zarr"]


@pytest.mark.slow
def test_killed_process_leaves_no_file_under_the_final_name(mosaic_path, tmp_path):
    script = textwrap.dedent(f"""
        import time
        from wsi_export.export import export_slide
        export_slide({str(mosaic_path)!r}, {str(tmp_path)!r}, "killed", ("ome-tiff", "ome-zarr"),
                     progress=lambda update: time.sleep(0.2))
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".export-partial") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not (tmp_path / "killed.ome.tif").exists() and not (tmp_path / "killed.ome.zarr").exists()
    assert all(p.name.startswith(".killed.") for p in tmp_path.iterdir())


def test_invalid_options_are_rejected_before_writing(mosaic_path, tmp_path):
    cases = [
        ({"formats": ("png",)}, "format 'png'"),
        ({"formats": ()}, "formats is empty"),
        ({"name": "../escape"}, "plain file stem"),
        ({"options": ExportOptions(compression="webp")}, "compression 'webp'"),
        ({"options": ExportOptions(quality=0)}, "quality=0"),
        ({"options": ExportOptions(tile_size_px=500)}, "tile_size_px=500"),
        ({"options": ExportOptions(jpeg_subsampling=(3, 3))}, "jpeg_subsampling"),
    ]
    for overrides, message in cases:
        arguments = {"name": "ok", "formats": ("ome-tiff",), "options": ExportOptions(), **overrides}
        with pytest.raises(ExportOptionsError, match=message.replace("(", r"\(")):
            export_slide(mosaic_path, tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_bad_mosaics_raise_clear_input_errors(mosaic_path, tmp_path):
    with pytest.raises(MosaicInputError, match="does not exist"):
        export_slide(tmp_path / "nope.zarr", tmp_path)
    group = zarr.open_group(str(tmp_path / "noattrs.zarr"), mode="w", zarr_format=3)
    group.create_array("image", shape=(64, 64, 3), dtype="uint8")
    with pytest.raises(MosaicInputError, match="no group attribute 'wsi_mosaic'"):
        export_slide(tmp_path / "noattrs.zarr", tmp_path)
    source = zarr.open_group(str(mosaic_path), mode="r")
    attributes = dict(source.attrs["wsi_mosaic"])
    for key in ("pixel_size_um", "objective_magnification", "acquisition_datetime", "complete"):
        partial = {k: v for k, v in attributes.items() if k != key}
        with pytest.raises(MosaicInputError, match=f"{key} is missing"):
            mosaic_from_array(source["image"], partial, "x")
    with pytest.raises(MosaicInputError, match="pixel_size_um=-1.0"):
        mosaic_from_array(source["image"], {**attributes, "pixel_size_um": -1.0}, "x")
    with pytest.raises(MosaicInputError, match="not ISO-8601"):
        mosaic_from_array(source["image"], {**attributes, "acquisition_datetime": "yesterday"}, "x")
    wrong_dtype = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8, 3), dtype="uint16")
    with pytest.raises(MosaicInputError, match="dtype uint16"):
        mosaic_from_array(wrong_dtype, attributes, "x")
    gray = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), dtype="uint8")
    with pytest.raises(MosaicInputError, match=r"shape \(8, 8\)"):
        mosaic_from_array(gray, attributes, "x")
    incomplete = mosaic_from_array(source["image"], {**attributes, "complete": False}, "x")
    with pytest.raises(MosaicInputError, match="complete=False"):
        export_slide(incomplete, tmp_path)
    assert export_slide(incomplete, tmp_path, formats=["ome-zarr"],
                        options=ExportOptions(allow_partial_mosaic=True)).levels == 3


def test_a_later_export_of_the_same_name_removes_what_a_killed_one_left(mosaic_path, tmp_path, export_work_dir,
                                                                        partial_look_alikes):
    killed = export_work_dir(tmp_path, "slide", running=False, age_s=3600)
    kept = [export_work_dir(tmp_path, "slide", running=True, age_s=3600),   # a live export: locked
            export_work_dir(tmp_path, "slide", running=False, age_s=0),     # an instant old: may not be locked yet
            export_work_dir(tmp_path, "other", running=False, age_s=3600),  # another export's
            *partial_look_alikes(tmp_path, "slide")]
    export_slide(mosaic_path, tmp_path, "slide", ("ome-zarr",))
    assert not killed.exists()
    assert all(os.path.lexists(path) for path in kept)
    assert (tmp_path / "slide.ome.zarr").is_dir()
