import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from wsi_acquisition.focus import FOCUS_MAP, MIN_SHARPNESS_GAIN
from wsi_acquisition.hardware import CameraError, SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.qc_report import write_qc_report
from wsi_acquisition import scan
from wsi_acquisition.scan import FocusReply, FocusStrategy, ScanError, ScanErrorCode, ScanRequest, ScanRunner, State
from wsi_acquisition.scan_request import DEFAULTS, MAX_FOCUS_POINTS, ScannerSettings
from wsi_common.focus_metrics import tissue_fraction
from wsi_common.scan_files import Manifest

# A small tissue region, imaged with a small sensor so that a scan takes a few seconds.
REGION_UM = (43_000.0, 12_000.0, 500.0, 400.0)


def small_microscope(seed=0):
    return SimulatedMicroscope.create(slide_seed=seed, speedup=1000.0, camera=Camera(width_px=256, height_px=256))


def request(tmp_path, **changes):
    values = dict(scan_id="s1", output_dir=tmp_path, region_um=REGION_UM, objective_magnification=20.0,
                  focus_strategy=FocusStrategy.MAP, focus_points=5, skip_empty_tiles=False)
    return ScanRequest(**(values | changes))


def test_scan_captures_every_planned_tile_in_focus_and_writes_the_manifest(tmp_path):
    backend = small_microscope()
    published, progress = [], []
    runner = ScanRunner(backend, request(tmp_path), publish_tile=lambda r, f: published.append((r, f)),
                        on_progress=lambda p: progress.append((p.state, p.tiles_done, p.eta_s)))
    outcome = runner.run()
    plan = outcome.plan
    assert len(plan.tiles) == plan.rows * plan.cols >= 20
    assert [(r.row, r.col) for r, _ in published] == [(t.row, t.col) for t in plan.tiles]
    assert plan.tiles[plan.cols].col == plan.cols - 1          # serpentine: row 1 runs right to left
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["status"] == "complete" and len(manifest["tiles"]) == len(plan.tiles)
    assert manifest["pixel_size_um"] == pytest.approx(backend.pixel_size_um())
    recorded = Manifest.read(outcome.manifest_path).plan()          # the plan as every reader sees it
    assert recorded.tiles == [(t.row, t.col) for t in plan.tiles] and recorded.grid.extent_um == plan.extent_um
    assert all(recorded.grid.centre_um(t.row, t.col) == (t.x_um, t.y_um) for t in plan.tiles)
    first = manifest["tiles"][0]
    stored = tifffile.imread(outcome.scan_dir / first["image"])
    np.testing.assert_array_equal(stored, published[0][1].image_rgb8)
    measured_error = [abs(t["measured_x_um"] - t["commanded_x_um"]) for t in manifest["tiles"]]
    assert 0 < max(measured_error) < 2.0                        # jitter and backlash, recorded
    defocus = np.array([t["ground_truth"]["defocus_um"] for t in manifest["tiles"]])
    assert np.max(np.abs(defocus)) < backend.depth_of_field_um()  # the focus map found the surface
    states = [s for s, _, _ in progress]
    assert states[0] == State.OVERVIEW and State.FOCUS_MAP in states and states[-1] == State.SUCCEEDED
    assert progress[-2][1] == len(plan.tiles) and progress[-2][2] == pytest.approx(0.0)


def test_without_focus_correction_tiles_are_out_of_focus(tmp_path):
    backend = small_microscope()
    outcome = ScanRunner(backend, request(tmp_path, focus_strategy=FocusStrategy.NONE)).run()
    defocus = [r.ground_truth["defocus_um"] for r in outcome.records]
    assert np.max(np.abs(defocus)) > backend.depth_of_field_um()


def test_inline_estimates_recapture_tiles_beyond_half_the_depth_of_field(tmp_path):
    backend = small_microscope()
    half_dof = backend.depth_of_field_um() / 2

    def oracle(record, frame):      # a perfect autofocus: the simulator's ground truth
        return FocusReply(frame.ground_truth_defocus_um, 0.1)

    # No focus map at all: start 3 µm off, inline correction must pull every tile in.
    runner = ScanRunner(backend, request(tmp_path, focus_strategy=FocusStrategy.MAP_INLINE, focus_points=1),
                        estimate_focus=oracle)
    runner.focus_map = lambda plan: None
    backend.stage.start_move(*backend.stage.position_um()[:2], 3.0 + float(backend.microscope.focal_z_um(
        REGION_UM[0], REGION_UM[1])))
    outcome = runner.run()
    assert outcome.refocus_count >= 1
    recaptures = [r for r in outcome.records if r.is_recapture]
    assert len(recaptures) == outcome.refocus_count
    final = {}
    for record in outcome.records:
        final[(record.row, record.col)] = record
    # A correction is kept only where it is measurably sharper: on bare glass it is not, and the focus
    # map's capture stays (kept beside it as a focus check).
    rejected = {(c["row"], c["col"]) for c in outcome.focus_checks if c["kind"] == "correction"}
    for cell, record in final.items():
        if cell in rejected:
            assert tissue_fraction(tifffile.imread(outcome.scan_dir / record.image)) < 0.05, cell
        else:
            assert abs(record.ground_truth["defocus_um"]) <= half_dof + 0.3, cell
    assert len(rejected) < len(final) / 2


def _scan_three_um_off_with(tmp_path, scan_id, estimate_focus, estimate_image):
    """A scan with no focus map that starts 3 µm above the slide's focus: inline correction must pull the
    tiles in. Returns the outcome and each cell's final record."""
    backend = small_microscope()
    runner = ScanRunner(backend, request(tmp_path, scan_id=scan_id, focus_strategy=FocusStrategy.MAP_INLINE,
                                         focus_points=1),
                        estimate_focus=estimate_focus, estimate_image=estimate_image)
    runner.focus_map = lambda plan: None
    backend.stage.start_move(*backend.stage.position_um()[:2], 3.0 + float(backend.microscope.focal_z_um(
        REGION_UM[0], REGION_UM[1])))
    outcome = runner.run()
    return outcome, {(r.row, r.col): r for r in outcome.records}, backend.depth_of_field_um() / 2


def test_a_correction_the_wrong_way_is_tried_the_other_way_and_kept_only_then(tmp_path):
    """An autofocus sure of the wrong side, as a microscope the model never saw can fool it: each correction
    moves the tile 3 µm further from focus and loses sharpness, so the scan tries the same move the other way,
    which lands in focus and becomes the tile; the wrong move stays beside it as a focus check. A field of
    glass loses no sharpness either way: it keeps the focus map's capture."""
    def wrong_side(record, frame):
        return FocusReply(-frame.ground_truth_defocus_um, 0.1)

    outcome, final, half_dof = _scan_three_um_off_with(tmp_path, "other-way", wrong_side, None)
    turned = 0
    for record in final.values():
        wrong, *other_way = [c for c in outcome.focus_checks if (c["row"], c["col"]) == (record.row, record.col)]
        assert wrong["offset_um"] > 2.0 and abs(wrong["ground_truth"]["defocus_um"]) > 4.0
        if wrong["sharpness_gain"] > -MIN_SHARPNESS_GAIN:
            assert record.focus_source == FOCUS_MAP and record.other_way_from_offset_um is None
            continue
        turned += 1
        assert abs(record.ground_truth["defocus_um"]) <= half_dof + 0.3, (record.row, record.col)
        assert record.other_way_from_offset_um == wrong["offset_um"] == pytest.approx(-record.applied_focus_offset_um)
        assert other_way == []
    assert turned > len(final) * 3 / 4
    summary = json.loads((write_qc_report(outcome.manifest_path).parent / "summary.json").read_text())
    assert summary["corrections tried the other way (they lost sharpness)"] == turned == outcome.refocus_count


def test_a_correction_that_went_through_focus_brackets_it_with_one_more_capture(tmp_path):
    """An autofocus that reads every distance twice too long, as the shipped model reads a ring-lit
    microscope it never saw: its corrections land as far on the other side of focus. The corrected capture
    still reads out of focus, so the scan takes one more where the two captures bracket focus."""
    def twice_too_long(record, frame):
        return FocusReply(2.0 * frame.ground_truth_defocus_um, 0.1)

    def distance_twice_too_long(frame, frame_above=None, step_um=0.0):
        distance = 2.0 * abs(frame.ground_truth_defocus_um)
        return FocusReply(0.0, 10.0, distance, 0.1, 0.5)

    outcome, final, half_dof = _scan_three_um_off_with(tmp_path, "bracketing", twice_too_long,
                                                       distance_twice_too_long)
    bracketed = [record for record in final.values() if record.bracketed_from_offset_um is not None]
    assert len(bracketed) > len(final) / 2
    for record in bracketed:
        assert abs(record.ground_truth["defocus_um"]) <= half_dof + 0.3, (record.row, record.col)
        # The correction went twice as far; its capture is kept beside the tile as a focus check.
        assert record.bracketed_from_offset_um == pytest.approx(2 * record.applied_focus_offset_um, abs=0.3)
        overshot = [c for c in outcome.focus_checks if (c["row"], c["col"]) == (record.row, record.col)]
        assert [c["offset_um"] for c in overshot] == [record.bracketed_from_offset_um]
        assert abs(overshot[0]["ground_truth"]["defocus_um"]) > 2.0
    # The QC report says which tiles were bracketed and does not call their first correction refused.
    summary = json.loads((write_qc_report(outcome.manifest_path).parent / "summary.json").read_text())
    assert summary["corrections that went on to bracket focus"] >= len(bracketed)
    assert summary["corrections refused (not sharper)"] == len(final) - outcome.refocus_count
    # Without the corrected capture's own estimate the scan cannot see it overshot: the tiles stay ~3 µm off.
    _, alone, _ = _scan_three_um_off_with(tmp_path, "no-bracketing", twice_too_long, None)
    assert np.median([abs(r.ground_truth["defocus_um"]) for r in alone.values()]) > 2.0


def test_a_correction_that_is_not_sharper_is_not_kept(tmp_path):
    """An autofocus that is confidently wrong (it reports the defocus with the wrong sign) must not make
    any tile worse than the focus map: every correction is checked against the capture it would replace."""
    backend = small_microscope()

    def wrong_way(record, frame):        # the side wrong and 2 µm too far: any correction ends farther off
        defocus = frame.ground_truth_defocus_um
        return FocusReply(-np.copysign(abs(defocus) + 2.0, defocus), 0.1)

    outcome = ScanRunner(backend, request(tmp_path, focus_strategy=FocusStrategy.MAP_INLINE),
                         estimate_focus=wrong_way).run()
    first = {}
    for record in outcome.records:
        first.setdefault((record.row, record.col), record)
    assert outcome.refocus_count == 0 and not any(r.is_recapture for r in outcome.records)
    assert all(r.focus_source == "focus-map" for r in outcome.records)
    checks = [c for c in outcome.focus_checks if c["kind"] == "correction"]
    # Every tile tried, and tried the other way where the first try lost sharpness; every try refused ...
    first_tries = [c for c in checks if c["other_way_from_offset_um"] is None]
    other_way = [c for c in checks if c["other_way_from_offset_um"] is not None]
    assert len(first_tries) == len(first)
    assert len(other_way) == sum(c["sharpness_gain"] <= -MIN_SHARPNESS_GAIN for c in first_tries) > len(first) / 2
    assert all(c["sharpness_gain"] < MIN_SHARPNESS_GAIN for c in checks)  # ... because it was not sharper
    assert np.median([c["sharpness_gain"] for c in checks]) < -0.2
    manifest = json.loads(outcome.manifest_path.read_text())
    assert len(manifest["focus_checks"]) == len(checks)
    assert all((outcome.scan_dir / c["image"]).exists() for c in manifest["focus_checks"])


def test_cancel_keeps_what_was_captured(tmp_path):
    backend = small_microscope()
    captured = []
    runner = ScanRunner(backend, request(tmp_path, focus_strategy=FocusStrategy.NONE),
                        publish_tile=lambda r, f: captured.append(r), should_cancel=lambda: len(captured) >= 4)
    with pytest.raises(ScanError) as raised:
        runner.run()
    assert raised.value.code == ScanErrorCode.CANCELED
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["status"] == "canceled" and len(manifest["tiles"]) == 4
    assert all((tmp_path / "s1" / t["image"]).exists() for t in manifest["tiles"])


CALIBRATED = {"success": True, "error": "", "model_dir": "/store/bench-1/20x_na0.75_px0.325"}


class Calibrator:
    """The autofocus's calibration as a scan calls it: records the focus-map sweeps the manifest lists at
    the time (each sweep's images on disk) and answers `answer`."""

    def __init__(self, answer: dict, events: list):
        self.answer, self.events = answer, events

    def __call__(self, scan_dir: Path) -> dict:
        sweeps = json.loads((scan_dir / "manifest.json").read_text())["focus_map"]["sweeps"]
        self.events.append(("calibration", [tifffile.imread(scan_dir / sweep["images"]).shape[0] for sweep in sweeps]))
        return self.answer


@pytest.mark.parametrize("answer", [CALIBRATED, {"success": False, "error": "no clear focus in 2 of 3 sweeps"}])
def test_a_scan_calibrates_the_autofocus_on_its_sweeps_before_its_first_tile(tmp_path, answer):
    events = []
    outcome = ScanRunner(small_microscope(), request(tmp_path, calibrate_autofocus=True),
                         publish_tile=lambda record, frame: events.append("tile"),
                         calibrate_focus=Calibrator(answer, events)).run()
    sweep_lengths = [len(sweep["z_um"]) for sweep in outcome.focus_sweeps]
    assert len(sweep_lengths) == 5 and min(sweep_lengths) > 10
    # One calibration, on every sweep, before the first tile; a failed one leaves the scan going on.
    assert events == [("calibration", sweep_lengths)] + ["tile"] * len(outcome.plan.tiles)
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["status"] == "complete" and manifest["autofocus_calibration"] == answer


def test_a_calibration_only_scan_ends_after_the_calibration_without_a_tile(tmp_path):
    events, progress = [], []
    backend = small_microscope()
    outcome = ScanRunner(backend, request(tmp_path, calibration_only=True),
                         publish_tile=lambda record, frame: events.append("tile"),
                         on_plan=lambda plan: events.append("plan"),       # no tiles to announce to a stitcher
                         on_progress=lambda p: progress.append(p.state),
                         calibrate_focus=Calibrator(CALIBRATED, events)).run()
    assert events == [("calibration", [len(sweep["z_um"]) for sweep in outcome.focus_sweeps])]
    assert outcome.records == [] and len(outcome.plan.tiles) >= 20
    assert progress[-3:] == [State.FOCUS_MAP, State.CALIBRATING, State.SUCCEEDED]
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["status"] == "complete" and manifest["tiles"] == []
    assert manifest["autofocus_calibration"] == CALIBRATED
    assert not any((outcome.scan_dir / "tiles").iterdir())


@pytest.mark.parametrize("answer, cancel, code, message", [
    ({"success": False, "error": "no clear focus in 2 of 3 sweeps"}, False, ScanErrorCode.CALIBRATION,
     r"the autofocus was not calibrated \(the models in use are kept\): no clear focus in 2 of 3 sweeps"),
    (None, False, ScanErrorCode.CALIBRATION, "no autofocus is connected to this scan to calibrate"),
    ({"success": False, "error": "the scan was cancelled before the calibration answered"}, True,
     ScanErrorCode.CANCELED, "canceled during the autofocus calibration"),
])
def test_a_calibration_only_scan_whose_calibration_is_not_made_fails_with_the_reason(tmp_path, answer, cancel, code,
                                                                                      message):
    events = []
    runner = ScanRunner(small_microscope(), request(tmp_path, calibration_only=True),
                        calibrate_focus=answer and Calibrator(answer, events),
                        should_cancel=lambda: cancel and bool(events))     # cancelled while it calibrates
    with pytest.raises(ScanError, match=message) as raised:
        runner.run()
    assert raised.value.code == code
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["status"] == ("canceled" if cancel else "failed") and manifest["tiles"] == []
    assert len(manifest["focus_map"]["sweeps"]) == 5 and manifest["autofocus_calibration"]["success"] is False


KILLED_SCAN = """
import os, signal, sys
from pathlib import Path
from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner

published = []

def publish_and_die_on_the_fifth(record, frame):
    published.append(record)
    if len(published) == 5:         # the fifth tile is saved, its journal line not yet written
        os.kill(os.getpid(), signal.SIGKILL)

backend = SimulatedMicroscope.create(speedup=1000.0, camera=Camera(width_px=256, height_px=256))
ScanRunner(backend, ScanRequest(scan_id="killed", output_dir=Path(sys.argv[1]), region_um=%r,
                                focus_strategy=FocusStrategy.NONE, skip_empty_tiles=False),
           publish_tile=publish_and_die_on_the_fifth).run()
""" % (REGION_UM,)


def test_a_killed_scan_reads_as_every_tile_recorded_before_the_kill(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_SCAN, str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    manifest = Manifest.read(tmp_path / "killed" / "manifest.json")
    assert manifest.status == "running"
    tiles = manifest.tiles()        # every listed image is checked to be on disk
    assert [(t.row, t.col) for t in tiles] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert all(tifffile.imread(t.image_path).shape == (256, 256, 3) for t in tiles)


class FlakyCamera:
    """Wraps a backend; its camera times out reading chosen exposures out (counted from 1)."""

    def __init__(self, backend, failing):
        self._backend, self._failing, self._count = backend, failing, 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def expose(self, *args, **kwargs):
        return self._flaky(self._backend.expose(*args, **kwargs))

    def z_pass(self, *args, **kwargs):
        return [(z, self._flaky(read_out)) for z, read_out in self._backend.z_pass(*args, **kwargs)]

    def _flaky(self, read_out):
        self._count += 1
        count = self._count

        def flaky_read_out():
            if self._failing(count):
                raise CameraError(f"timeout waiting for frame {count}")
            return read_out()
        return flaky_read_out


def test_camera_timeouts_are_retried(tmp_path):
    backend = FlakyCamera(small_microscope(), failing=lambda n: n % 3 == 0)
    outcome = ScanRunner(backend, request(tmp_path)).run()
    assert len(outcome.records) == len(outcome.plan.tiles)
    # Sweep images are read out while the stage steps on: a lost one is taken again at its z, so every sweep
    # still has an image per z and finds focus.
    for sweep in outcome.focus_sweeps:
        assert tifffile.imread(outcome.scan_dir / sweep["images"]).shape[0] == len(sweep["z_um"])
    defocus = np.array([r.ground_truth["defocus_um"] for r in outcome.records])
    assert np.max(np.abs(defocus)) < backend.depth_of_field_um()


class StageLog:
    """Wraps a backend; logs stage moves, exposures and read-outs in the order they happen. A read-out takes at
    least `read_out_s`, as a camera's transfer does: the scan's background move starts on another thread, and a
    tiny simulated image could otherwise be read before that thread is scheduled, whatever the scan's order."""

    def __init__(self, backend, read_out_s: float = 0.05):
        self._backend, self.events, self.read_out_s = backend, [], read_out_s
        start_move = backend.stage.start_move

        def logged_move(x_um, y_um, z_um, speed_um_s=0.0):
            self.events.append(("move", (x_um, y_um)))
            return start_move(x_um, y_um, z_um, speed_um_s)
        backend.stage.start_move = logged_move

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def expose(self, exposure_ms, gain=1.0, roi=None):
        self.events.append(("expose", roi))
        read_out = self._backend.expose(exposure_ms, gain, roi)

        def logged_read_out():
            time.sleep(self.read_out_s)
            frame = read_out()
            self.events.append(("read", roi, (frame.true_x_um, frame.true_y_um)))
            return frame
        return logged_read_out


def test_a_z_sweep_is_one_strobed_pass_whose_images_sit_where_stepping_would_put_them():
    backend = small_microscope()
    backend.set_objective(20.0)
    stage, dynamics = backend.stage, backend.stage.dynamics
    moves = []
    start_move = stage.start_move

    def logged_move(*args, **kwargs):
        moves.append(kwargs.get("z_speed_um_s", 0.0))
        return start_move(*args, **kwargs)
    stage.start_move = logged_move
    x_um, y_um = 43_200.0, 12_200.0
    z_values = list(np.arange(-6.0, 6.01, 1.5))
    passed = backend.z_pass(x_um, y_um, z_values, 8.0, roi=(64, 64, 128, 128))
    assert [z for z, _ in passed] == z_values
    # At most two moves to the start (from below) and the pass itself, at one z step per camera frame.
    assert len(moves) <= 3 and moves[-1] == pytest.approx(1.5 * backend.frame_rate_hz)
    frames = [read_out() for _, read_out in passed]
    assert all(f.image_rgb8.shape == (128, 128, 3) for f in frames)
    # A move to z from below leaves the carriage half the backlash short of it; the flashes see it there too.
    stage_at = [f.true_z_um for f in frames]
    np.testing.assert_allclose(stage_at, np.array(z_values) - dynamics.backlash_um / 2, atol=0.15)
    assert not stage.is_moving()


def test_the_stage_heads_for_the_next_tile_while_a_tile_is_read_out(tmp_path):
    backend = StageLog(small_microscope())
    outcome = ScanRunner(backend, request(tmp_path, focus_strategy=FocusStrategy.NONE)).run()
    tiles = outcome.plan.tiles
    events = backend.events
    exposures = [i for i, event in enumerate(events) if event == ("expose", None)]
    assert len(exposures) == len(tiles)
    for tile, following, exposure in zip(tiles, tiles[1:], exposures):
        read = next(i for i in range(exposure, len(events)) if events[i][0] == "read")
        assert events[read][2] == pytest.approx((tile.x_um, tile.y_um), abs=2.0)   # this tile's image...
        moves = [event[1] for event in events[exposure:read] if event[0] == "move"]
        assert moves and moves[-1] == (following.x_um, following.y_um)          # ...read after the next move began
    records = outcome.records
    assert [(r.row, r.col) for r in records] == [(t.row, t.col) for t in tiles]
    for record, tile in zip(records, tiles):
        assert (record.ground_truth["x_um"], record.ground_truth["y_um"]) == pytest.approx((tile.x_um, tile.y_um),
                                                                                             abs=2.0)


@pytest.mark.parametrize("changes, code, message", [
    (dict(region_um=(74_900.0, 100.0, 500.0, 500.0)), ScanErrorCode.INVALID_GOAL, "outside the stage limits"),
    (dict(objective_magnification=63.0), ScanErrorCode.INVALID_GOAL, "no 63.0x objective"),
    (dict(overlap_fraction=0.7), ScanErrorCode.INVALID_GOAL, "overlap 0.7"),
    (dict(region_um=(float("nan"), 12_000.0, 500.0, 400.0)), ScanErrorCode.INVALID_GOAL,
     "region x=nan, y=12000.0, 500.0 x 400.0 µm; expected finite numbers"),
    (dict(focus_points=1_000_000), ScanErrorCode.INVALID_GOAL,
     f"focus_points 1000000; expected 0 \\(automatic\\) to {MAX_FOCUS_POINTS}"),
    (dict(focus_strategy=FocusStrategy.NONE, calibrate_autofocus=True), ScanErrorCode.INVALID_GOAL,
     "with FOCUS_NONE there are none"),
    (dict(focus_strategy=FocusStrategy.NONE, calibration_only=True), ScanErrorCode.INVALID_GOAL,
     "with FOCUS_NONE there are none"),
    (dict(calibration_only=True, output_formats=("ome-tiff",)), ScanErrorCode.INVALID_GOAL,
     r"output formats \['ome-tiff'\] with calibration_only, which captures no tiles"),
    (dict(scan_id="../s1"), ScanErrorCode.INVALID_GOAL, "scan_id '../s1' must be"),
    (dict(output_formats=("ome-tiff", "png")), ScanErrorCode.INVALID_GOAL, "output formats"),
    (dict(region_um=(3_000.0, 3_000.0, 400.0, 400.0), skip_empty_tiles=True), ScanErrorCode.NO_TISSUE,
     "no tissue"),
])
def test_bad_goals_fail_before_anything_moves(tmp_path, changes, code, message):
    backend = small_microscope()
    start = backend.stage.position_um()
    with pytest.raises(ScanError, match=message) as raised:
        ScanRunner(backend, request(tmp_path, **changes)).run()
    assert raised.value.code == code
    assert backend.stage.position_um() == start


def test_focus_points_without_a_clear_peak_are_replaced(tmp_path):
    backend = small_microscope()
    runner = ScanRunner(backend, request(tmp_path, region_um=(43_000.0, 12_000.0, 400.0, 300.0), focus_points=4))
    backend.set_objective(20.0)
    plan = runner.plan()
    assert runner.find_focus(8_000.0, 5_000.0, 0.0) is None                     # bare glass: no peak
    asked, measure = [], runner.find_focus

    def first_two_on_glass(x_um, y_um, z_guess_um):
        asked.append((x_um, y_um))
        return None if len(asked) <= 2 else measure(x_um, y_um, z_guess_um)

    runner.find_focus = first_two_on_glass
    focus_map = runner.focus_map(plan)
    assert len(asked) == 6 and len(focus_map.inliers) == 4
    xs = np.array([t.x_um for t in plan.tiles])
    ys = np.array([t.y_um for t in plan.tiles])
    error = focus_map.z_um(xs, ys) - backend.microscope.focal_z_um(xs, ys)
    assert np.ptp(error) < backend.depth_of_field_um()


class StainlessCamera(FlakyCamera):
    """Wraps a backend; its camera sees the field without stain: grey, each channel with its own noise as a colour
    camera's (as over dust or debris on glass), or equal channels as a monochrome camera's."""

    def __init__(self, backend, monochrome: bool):
        super().__init__(backend, failing=lambda count: False)
        self._monochrome, self._rng = monochrome, np.random.default_rng(0)

    def _flaky(self, read_out):
        def grey_read_out():
            frame = read_out()
            grey = np.repeat((frame.image_rgb8 @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
            if not self._monochrome:
                grey = grey + self._rng.normal(0.0, 1.0, grey.shape)
            return dataclasses.replace(frame, image_rgb8=np.clip(np.round(grey), 0, 255).astype(np.uint8))
        return grey_read_out


def test_a_focus_point_whose_sharpness_peak_shows_no_stain_is_replaced(tmp_path):
    """Dust on glass can peak as clearly as tissue, at a z that is not the section's: the focus map measures
    another point instead. A monochrome camera shows no stain at all, so its peaks are taken as they are."""
    backend = small_microscope()
    backend.set_objective(20.0)
    x_um, y_um = 43_250.0, 12_200.0
    found = ScanRunner(backend, request(tmp_path)).find_focus(x_um, y_um, 0.0)
    assert found == pytest.approx(float(backend.microscope.focal_z_um(x_um, y_um)), abs=backend.depth_of_field_um())
    colour = ScanRunner(StainlessCamera(backend, monochrome=False), request(tmp_path, scan_id="s2"))
    assert colour.find_focus(x_um, y_um, 0.0) is None and colour.outcome.focus_sweeps == []
    monochrome = ScanRunner(StainlessCamera(backend, monochrome=True), request(tmp_path, scan_id="s3"))
    assert monochrome.find_focus(x_um, y_um, 0.0) == pytest.approx(found, abs=0.5)


class NoMacroCamera(FlakyCamera):
    def has_overview(self):
        return False

    def overview(self):
        raise AssertionError("goal validation must not take an overview image")


def test_automatic_tissue_detection_needs_a_macro_camera(tmp_path):
    backend = NoMacroCamera(small_microscope(), failing=lambda n: False)
    with pytest.raises(ScanError, match="needs an overview camera") as raised:
        request(tmp_path, region_um=None).validate(backend)
    assert raised.value.code == ScanErrorCode.INVALID_GOAL


def goal(**changes):
    """The fields of a ScanSlide goal, as the message's defaults leave them."""
    values = dict(scan_id="", auto_detect_tissue=False, region_x_um=0.0, region_y_um=0.0, region_width_um=0.0,
                  region_height_um=0.0, objective_magnification=0.0, pixel_size_um=0.0, overlap_fraction=0.0,
                  focus_strategy=0, focus_points=0, skip_empty_tiles=False, calibrate_autofocus=False,
                  calibration_only=False, output_dir="", output_formats=[])
    return SimpleNamespace(**(values | changes))


def test_a_goal_s_zero_fields_take_the_defaults_and_an_empty_scan_id_is_a_new_one(tmp_path):
    backend = small_microscope()
    settings = ScannerSettings(output_root=tmp_path, exposure_ms=5.0)
    now = time.strptime("2025-03-01 10:20:30", "%Y-%m-%d %H:%M:%S")
    (tmp_path / "scan-20250301-102030").mkdir()                     # a scan of the same second
    request = ScanRequest.from_goal(goal(output_formats=["ome-tiff"]), settings, backend, now)
    limits = backend.stage.limits
    assert request.scan_id == "scan-20250301-102030-2" and request.output_dir == tmp_path.resolve()
    assert request.region_um == (limits.x_min_um, limits.y_min_um, limits.x_max_um - limits.x_min_um,
                                 limits.y_max_um - limits.y_min_um)           # 0 x 0: the whole slide area
    assert request.objective_magnification == DEFAULTS["objective_magnification"]
    assert request.overlap_fraction == DEFAULTS["overlap_fraction"] and request.exposure_ms == 5.0
    assert request.focus_strategy == FocusStrategy.NONE and request.output_formats == ("ome-tiff",)


@pytest.mark.parametrize("changes, message", [
    (dict(output_dir="../elsewhere"), "output_dir '../elsewhere' is outside the output root"),
    (dict(pixel_size_um=0.5), "pixel_size_um 0.5: tiles are taken at the objective's native pixel size"),
    (dict(focus_strategy=7), r"focus_strategy 7; expected one of \[0, 1, 2\]"),
    (dict(region_x_um=float("nan"), region_width_um=100.0, region_height_um=100.0), "expected finite numbers"),
])
def test_goals_that_break_a_rule_are_refused_with_the_rule(tmp_path, changes, message):
    with pytest.raises(ScanError, match=message) as raised:
        ScanRequest.from_goal(goal(scan_id="g1", **changes), ScannerSettings(tmp_path), small_microscope())
    assert raised.value.code == ScanErrorCode.INVALID_GOAL
    assert not (tmp_path / "g1").exists()


def test_a_scan_id_whose_folder_holds_an_earlier_scan_is_refused_and_that_scan_kept(tmp_path):
    killed = tmp_path / "s1"
    (killed / "tiles").mkdir(parents=True)
    (killed / "manifest.json").write_text('{"status": "running"}')
    backend = small_microscope()
    start = backend.stage.position_um()
    with pytest.raises(ScanError, match="already holds the files of an earlier scan") as raised:
        ScanRunner(backend, request(tmp_path)).run()
    assert raised.value.code == ScanErrorCode.INVALID_GOAL and backend.stage.position_um() == start
    assert (killed / "manifest.json").read_text() == '{"status": "running"}'
    assert sorted(p.name for p in killed.rglob("*")) == ["manifest.json", "tiles"]


def test_an_invalid_request_leaves_no_scan_folder(tmp_path):
    with pytest.raises(ScanError, match="overlap 0.7"):
        ScanRunner(small_microscope(), request(tmp_path, overlap_fraction=0.7)).run()
    assert not (tmp_path / "s1").exists()      # so the corrected goal may use the same scan_id


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")

    def fill_the_disk(handle):
        handle.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        scan._write_atomically(path, fill_the_disk)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]


FULL_DISK_SCAN = """
import json, subprocess, sys
from pathlib import Path
import tifffile
from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.scan import FocusStrategy, ScanError, ScanRequest, ScanRunner
from wsi_common.scan_files import Manifest

disk = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
backend = SimulatedMicroscope.create(speedup=1000.0, camera=Camera(width_px=256, height_px=256))
request = ScanRequest(scan_id="full", output_dir=disk, region_um=(43_000.0, 12_000.0, 500.0, 400.0),
                      focus_strategy=FocusStrategy.NONE, skip_empty_tiles=False)
try:
    ScanRunner(backend, request).run()
    report = {"error": None}
except ScanError as error:
    report = {"code": int(error.code), "error": str(error)}
scan_dir = disk / "full"
report["files"] = sorted(str(p.relative_to(scan_dir)) for p in scan_dir.rglob("*"))
manifest = Manifest.read(scan_dir / "manifest.json")
report["status"], report["listed"] = manifest.status, [t["image"] for t in manifest.document["tiles"]]
report["readable"] = [tifffile.imread(scan_dir / image).shape == (256, 256, 3) for image in report["listed"]]
print(json.dumps(report))
"""


def test_a_full_disk_leaves_only_complete_tiles_a_valid_manifest_and_names_the_tile(tmp_path):
    """A real 1 MiB file system fills up after a few 256x256 tiles (mounted in a user namespace of its own,
    so no root is needed where the kernel allows those)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("cannot mount a small file system here: no user namespaces")
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK_SCAN, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["code"] == ScanErrorCode.STORAGE
    assert report["error"].startswith("cannot save tile (")
    free_mb = float(re.search(r"\((\d+\.\d) MB free there\)", report["error"]).group(1))
    assert free_mb < 256 * 256 * 3 / 1e6                # less than a tile needs: the disk is full
    assert report["status"] == "failed" and 2 <= len(report["listed"]) and all(report["readable"])
    # nothing but the complete tiles the manifest lists: no truncated tile, no temporary file (the journal
    # stays when the disk had no room for the final manifest)
    assert set(report["files"]) - {"manifest.journal.jsonl"} == {"manifest.json", "tiles", *report["listed"]}
