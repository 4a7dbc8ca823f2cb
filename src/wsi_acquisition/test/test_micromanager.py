"""The Micro-Manager backend, run for real through pymmcore-plus with the simulator as Python devices."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_acquisition.hardware import CameraError, SimulatedMicroscope, snap
from wsi_acquisition.micromanager import (MicroManagerConfigError, MicroManagerMicroscope, load_micromanager,
                                          mm_image_to_rgb8, objectives_from_lists)
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.mm_sim_devices import (CAMERA_LABEL, OBJECTIVE_GROUP, TURRET_LABEL, XY_STAGE_LABEL,
                                            simulated_core, simulated_micromanager)
from wsi_acquisition.optics import Camera
from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner
from wsi_acquisition.stage import StageFault, StageLimitError

REGION_UM = (43_000.0, 12_000.0, 500.0, 400.0)    # tissue on the default slide


def small_sim(seed=0):
    return SimulatedMicroscope.create(slide_seed=seed, speedup=1000.0, camera=Camera(width_px=256, height_px=256))


def wait_until_still(stage, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while stage.is_moving():
        assert time.monotonic() < deadline, "stage still moving"
        time.sleep(0.001)


def test_scan_through_micromanager_captures_every_tile_in_focus(tmp_path):
    sim = small_sim()
    backend = simulated_micromanager(sim)
    published = []
    request = ScanRequest(scan_id="mm1", output_dir=tmp_path, region_um=REGION_UM, focus_strategy=FocusStrategy.MAP,
                          focus_points=5, skip_empty_tiles=False)
    outcome = ScanRunner(backend, request, publish_tile=lambda r, f: published.append((r, f))).run()
    plan = outcome.plan
    assert len(plan.tiles) == plan.rows * plan.cols >= 20
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["status"] == "complete" and len(manifest["tiles"]) == len(plan.tiles) == len(published)
    assert manifest["pixel_size_um"] == pytest.approx(sim.pixel_size_um())
    assert manifest["tile_width_px"] == 256 and manifest["numerical_aperture"] == pytest.approx(0.75)
    stored = tifffile.imread(outcome.scan_dir / manifest["tiles"][-1]["image"])
    np.testing.assert_array_equal(stored, published[-1][1].image_rgb8)
    # The positions went through the Micro-Manager core: the encoder reading the core reports.
    last = manifest["tiles"][-1]
    assert backend.core.getXYPosition(XY_STAGE_LABEL) == pytest.approx((last["measured_x_um"], last["measured_y_um"]))
    for tile in manifest["tiles"]:
        truth = tile["ground_truth"]
        assert abs(truth["x_um"] - tile["commanded_x_um"]) < 2.0 and abs(truth["y_um"] - tile["commanded_y_um"]) < 2.0
        assert abs(truth["x_um"] - tile["measured_x_um"]) <= sim.stage.dynamics.encoder_resolution_um
    defocus = np.array([t["ground_truth"]["defocus_um"] for t in manifest["tiles"]])
    assert np.max(np.abs(defocus)) < backend.depth_of_field_um()


def test_a_micromanager_snap_is_the_virtual_microscope_image_pixel_for_pixel():
    sim = small_sim()
    backend = simulated_micromanager(sim)
    backend.stage.start_move(43_100.0, 12_100.0, 2.0)
    wait_until_still(backend.stage)
    frame = snap(backend, 6.0, 1.5, roi=(40, 10, 64, 128))
    reference = VirtualMicroscope(seed=0, camera=Camera(width_px=256, height_px=256)).capture(
        *sim.stage.true_position_um(), 20.0, exposure_ms=6.0, gain=1.5, roi=(40, 10, 64, 128))
    np.testing.assert_array_equal(frame.image_rgb8, reference.image_rgb8)   # BGRA order, ROI offset, gain
    assert frame.ground_truth_defocus_um == pytest.approx(reference.defocus_um)
    assert backend.core.getROI(CAMERA_LABEL) == [0, 0, 256, 256]           # ROI cleared after the snap
    assert snap(backend, 6.0).image_rgb8.shape == (256, 256, 3)


def test_objectives_switch_through_the_config_group():
    backend = simulated_micromanager(small_sim())
    backend.set_objective(40.0)
    assert backend.core.getProperty(TURRET_LABEL, "Label") == "40x"
    assert backend.core.getCurrentConfig(OBJECTIVE_GROUP) == "40x"
    assert backend.pixel_size_um() == pytest.approx(6.5 / 40)
    assert backend.field_of_view_um() == pytest.approx((256 * 6.5 / 40,) * 2)
    with pytest.raises(MicroManagerConfigError, match="no 63.0x objective; available: \\[10.0, 20.0, 40.0\\]"):
        backend.set_objective(63.0)


def test_without_a_given_pixel_size_the_core_pixel_size_configuration_is_used(monkeypatch):
    sim = small_sim()
    core, _ = simulated_core(sim)
    # Python devices have no pixel-size configuration, so the core reports 0: a clear error.
    with pytest.raises(MicroManagerConfigError, match="no pixel size for the 20.0x objective"):
        MicroManagerMicroscope(core, sim.stage.limits, {20.0: (0.75,)})
    monkeypatch.setattr(core, "getPixelSizeUm", lambda cached=False: 0.5)
    backend = MicroManagerMicroscope(core, sim.stage.limits, {20.0: (0.75,)})
    assert backend.pixel_size_um() == 0.5 and backend.field_of_view_um() == (128.0, 128.0)


def test_a_camera_failure_is_a_camera_error_with_the_device_message():
    sim = small_sim()
    core, camera = simulated_core(sim)
    backend = MicroManagerMicroscope(core, sim.stage.limits, {20.0: (0.75, 0.325)})
    camera.fault = "frame timeout after 500 ms"
    with pytest.raises(CameraError, match="SimCamera: snap failed: frame timeout after 500 ms"):
        snap(backend, 8.0)
    with pytest.raises(CameraError, match="not inside the 256x256 px sensor"):
        snap(backend, 8.0, roi=(200, 0, 100, 100))


def test_stage_limits_faults_and_stop():
    sim = small_sim()
    core, _ = simulated_core(sim)
    backend = MicroManagerMicroscope(core, sim.stage.limits, {20.0: (0.75, 0.325)})
    stage = backend.stage
    start = stage.position_um()
    with pytest.raises(StageLimitError, match="x=80000.000 µm is outside"):
        stage.start_move(80_000.0, 10_000.0, 0.0)
    assert stage.position_um() == start and not stage.is_moving()
    with pytest.raises(StageFault, match="no standard stage speed control"):
        stage.start_move(*start, speed_um_s=100.0)
    sim.stage.fault = "X axis following error"
    with pytest.raises(StageFault, match="SimXYStage: move to .* failed: X axis following error"):
        stage.start_move(start[0] + 500.0, start[1], 0.0)
    sim.stage.fault = ""
    slow = SimulatedMicroscope.create(speedup=1.0, camera=Camera(width_px=64, height_px=64))
    slow_backend = simulated_micromanager(slow)
    x, y, z = slow_backend.stage.position_um()
    expected_s = slow_backend.stage.start_move(x + 20_000.0, y, z)
    assert expected_s > 0.5 and slow_backend.stage.is_moving()
    slow_backend.stage.stop()
    assert not slow_backend.stage.is_moving()
    stopped_x = slow_backend.stage.position_um()[0]
    assert x <= stopped_x < x + 20_000.0


def test_image_conversion_of_micromanager_pixel_formats():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    bgra = np.concatenate([rgb[..., ::-1], np.full((4, 5, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(mm_image_to_rgb8(bgra, 8), rgb)
    np.testing.assert_array_equal(mm_image_to_rgb8(bgra.view(np.uint32)[..., 0], 8), rgb)   # packed RGB32
    mono12 = np.array([[0, 4095], [2048, 16]], dtype=np.uint16)
    grey = mm_image_to_rgb8(mono12, 12)
    assert grey.shape == (2, 2, 3) and grey[0, 1].tolist() == [255] * 3 and grey[1, 0, 0] == 128
    with pytest.raises(CameraError, match="shape \\(4, 5, 2\\)"):
        mm_image_to_rgb8(rgb[..., :2], 8)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(MicroManagerConfigError, match="does not exist"):
        load_micromanager(tmp_path / "missing.cfg")
    config = tmp_path / "scope.cfg"
    config.write_text("Device,XY,NoSuchAdapterLibrary,XYStage\n")
    with pytest.raises(MicroManagerConfigError, match="cannot load Micro-Manager config .*scope.cfg"):
        load_micromanager(config, adapter_dir=tmp_path)
    with pytest.raises(MicroManagerConfigError, match="lengths magnifications=2, numerical_apertures=1"):
        objectives_from_lists([20.0, 40.0], [0.75], [0.0, 0.0], ["", ""])


def test_the_microscope_node_loads_the_config_named_by_its_parameters(tmp_path):
    from wsi_acquisition.microscope_node import PARAMETERS, build_backend

    parameters = {name: default for name, (default, _) in PARAMETERS.items()}
    with pytest.raises(MicroManagerConfigError, match="scope.cfg does not exist"):
        build_backend(parameters | {"backend": "micromanager", "mm_config": str(tmp_path / "scope.cfg")})
    sim_through_mm = build_backend(parameters | {"backend": "micromanager-sim", "camera_width_px": 64,
                                                 "camera_height_px": 48})
    assert isinstance(sim_through_mm, MicroManagerMicroscope) and sim_through_mm.sensor_size_px() == (64, 48)
