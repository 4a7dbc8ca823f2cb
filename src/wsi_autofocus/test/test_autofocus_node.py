"""The autofocus node in its own process: EstimateFocus answers, published tiles get estimates."""
import glob
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from sensor_msgs.msg import Image

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus.inference import GPU_DEVICE_FILES, FocusEstimator, load_backend
from wsi_acquisition.optics import DEFAULT_CONDENSER_FILL
from wsi_autofocus.two_shot import UNKNOWN_CONDENSER, Condenser, TwoShotModel
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path
from wsi_common.image import array_to_image
from wsi_common.ros_env import node_environment
from wsi_common.service_caller import ANSWER_WAIT_S, query
from wsi_common.supervisor import NodeSpec
from wsi_common.topics import FOCUS_ESTIMATES
from wsi_interfaces.srv import EstimateFocus

pytestmark = pytest.mark.ros


@pytest.fixture
def autofocus(run_nodes, ros_node, tiny_model):
    run_nodes([NodeSpec(name="autofocus", package="wsi_autofocus", executable="autofocus_node",
                        module="wsi_autofocus.node", parameters={"model_dir": str(tiny_model), "backend": "auto"})])
    client = ros_node.create_client(EstimateFocus, "estimate_focus")
    assert client.wait_for_service(timeout_sec=30)
    return client


def call(node, client, request, answer_wait_s: float = ANSWER_WAIT_S):
    """The answer within 60 s, or within `answer_wait_s` if longer; asked again when it is lost (a calibration is
    asked again only after `answer_wait_s`)."""
    answer = query(client, request, max(60.0, answer_wait_s), node=node, answer_wait_s=answer_wait_s)
    assert answer is not None, f"{client.srv_name} did not answer"
    return answer


def test_estimate_focus_answers_for_an_image(autofocus, ros_node):
    microscope = VirtualMicroscope(seed=200)
    x, y = 43_000.0, 12_500.0
    capture = microscope.capture(x, y, microscope.focal_z_um(x, y) + 4.0, 20, roi=(256, 256, 512, 512))
    request = EstimateFocus.Request(pixel_size_um=capture.pixel_size_um, numerical_aperture=0.75)
    array_to_image(capture.image_rgb8, "rgb8", request.image)
    response = call(ros_node, autofocus, request)
    assert response.success, response.error
    assert np.isfinite(response.defocus_um) and response.uncertainty_um > 0
    assert response.backend == "onnxruntime" and response.model_id.startswith("focus_resnet_small@")
    assert 0.5 < response.tissue_fraction <= 1.0 and response.inference_latency_ms > 0


def test_two_exposures_of_a_field_give_its_defocus_from_both(autofocus, ros_node):
    microscope = VirtualMicroscope(seed=200)
    x, y = 43_000.0, 12_500.0
    step_um = 2.0
    for defocus_um in (-5.0, 5.0):
        first, above = (microscope.capture(x, y, microscope.focal_z_um(x, y) + z, 20, roi=(256, 256, 512, 512))
                        for z in (defocus_um, defocus_um + step_um))
        request = EstimateFocus.Request(pixel_size_um=first.pixel_size_um, numerical_aperture=first.numerical_aperture,
                                        step_above_um=step_um)
        array_to_image(first.image_rgb8, "rgb8", request.image)
        array_to_image(above.image_rgb8, "rgb8", request.image_above)
        response = call(ros_node, autofocus, request)
        assert response.success and response.exposures_used == 2, response.error
        assert response.two_shot_model == str(default_two_shot_path())
        assert abs(response.defocus_um - defocus_um) < 2.0 and response.distance_um == abs(response.defocus_um)
        assert (response.above_focus_probability > 0.5) == (defocus_um > 0)
    # A pair is refused with the reason when it cannot be compared: no optics, or images of two sizes.
    request.numerical_aperture = 0.0
    response = call(ros_node, autofocus, request)
    assert not response.success and "need the objective's NA" in response.error
    request.numerical_aperture = first.numerical_aperture
    array_to_image(above.image_rgb8[:256], "rgb8", request.image_above)
    response = call(ros_node, autofocus, request)
    assert not response.success and "differ in shape" in response.error


def test_bad_images_get_a_reason_not_a_crash(autofocus, ros_node):
    request = EstimateFocus.Request()
    request.image = Image(height=4, width=4, encoding="yuv422", step=8, data=bytes(32))
    response = call(ros_node, autofocus, request)
    assert not response.success and "unsupported image encoding 'yuv422'" in response.error
    request = EstimateFocus.Request()
    array_to_image(np.zeros((96, 96, 3), np.uint8), "rgb8", request.image)
    response = call(ros_node, autofocus, request)
    assert not response.success and "smaller than the model's 128 px field" in response.error
    array_to_image(np.full((128, 128, 3), 120, np.uint8), "rgb8", request.image)
    for numerical_aperture, pixel_size_um, reason in ((float("nan"), 0.325, "numerical aperture nan"),
                                                      (1e30, 0.325, "numerical aperture 1e+30"),
                                                      (0.75, -0.3, "pixel size -0.3 µm"),
                                                      (0.75, float("inf"), "pixel size inf µm")):
        request.numerical_aperture, request.pixel_size_um = numerical_aperture, pixel_size_um
        response = call(ros_node, autofocus, request)
        assert not response.success and reason in response.error
    # Still alive and answering:
    request.numerical_aperture, request.pixel_size_um = 0.75, 0.325
    assert call(ros_node, autofocus, request).success


def test_published_tiles_are_tagged_with_estimates(autofocus, ros_node):
    estimates = []
    FOCUS_ESTIMATES.subscription(ros_node, estimates.append)
    sender = subprocess.run([sys.executable, "-m", "wsi.tile_probe", "send", "--count", "6", "--size", "256",
                             "--rate", "50"], env=node_environment(), capture_output=True, text=True, timeout=60)
    assert sender.returncode == 0, sender.stderr
    deadline = time.monotonic() + 30
    while len(estimates) < 6 and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    assert sorted(e.sequence for e in estimates) == list(range(6))
    assert all(e.valid and e.scan_id == "probe" and e.patches_used == 4 for e in estimates)
    assert all(e.inference_latency_ms > 0 and e.backend == "onnxruntime" for e in estimates)


def test_calibration_from_a_scans_sweeps_serves_that_objective_from_then_on(run_nodes, ros_node, tiny_model,
                                                                           mismatched_two_shot_model, tmp_path):
    """A scan calibrating itself (after its focus map, before its tiles): the single-shot model calibrated on its
    sweeps reads that scan's images, the two-shot model calibrated beside it the pairs of every scan with that
    objective. From a finished scan's sweeps only the two-shot model is calibrated: no tile is left to read."""
    from wsi_acquisition.hardware import SimulatedMicroscope, snap
    from wsi_acquisition.optics import Camera
    from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner
    from wsi_interfaces.srv import CalibrateAutofocus

    root = tmp_path / "calibration"
    run_nodes([NodeSpec(name="autofocus", package="wsi_autofocus", executable="autofocus_node",
                        module="wsi_autofocus.node",
                        parameters={"model_dir": str(tiny_model), "backend": "onnxruntime",
                                    "two_shot_model": str(mismatched_two_shot_model),
                                    "calibration_root": str(root), "scanner_name": "bench-1"})])
    calibrate = ros_node.create_client(CalibrateAutofocus, "calibrate_autofocus")
    estimate = ros_node.create_client(EstimateFocus, "estimate_focus")
    assert calibrate.wait_for_service(timeout_sec=30) and estimate.wait_for_service(timeout_sec=30)
    refused = call(ros_node, calibrate, CalibrateAutofocus.Request(scan_dir=str(tmp_path / "nowhere")))
    assert not refused.success and "nowhere" in refused.error
    answers = []

    def calibrate_scan(scan_dir):
        # 20 s on this machine; more than 60 s once on the CI machine. Its time is bench/calibration.py's to measure.
        answers.append(call(ros_node, calibrate, CalibrateAutofocus.Request(scan_dir=str(scan_dir)),
                            answer_wait_s=240.0))
        return {"success": answers[-1].success, "error": answers[-1].error}

    backend = SimulatedMicroscope.create(slide_seed=0, speedup=1000.0, camera=Camera(width_px=256, height_px=256))
    request = ScanRequest(scan_id="sweeps", output_dir=tmp_path, region_um=(43_000.0, 12_000.0, 250.0, 250.0),
                          focus_strategy=FocusStrategy.MAP, focus_points=3, skip_empty_tiles=False,
                          calibrate_autofocus=True)
    scan_dir = ScanRunner(backend, request, calibrate_focus=calibrate_scan).run().scan_dir
    answer, = answers
    assert answer.success and not answer.error, answer.error
    assert answer.model_dir == str(root / "bench-1" / "20x_na0.75_px0.325") and answer.sweeps == 3
    # The two-shot model is calibrated beside it, on every pair of sweep images a trained step apart.
    assert answer.two_shot_model == str(root / "bench-1" / "20x_na0.75_px0.325" / "two_shot.npz")
    assert Path(answer.two_shot_model).exists() and answer.two_shot_pairs > 100
    assert answer.two_shot_held_back_mae_after_um < answer.two_shot_held_back_mae_before_um
    image = np.asarray(snap(backend, 8.0).image_rgb8[:192, :192])
    asked = EstimateFocus.Request(pixel_size_um=0.325, numerical_aperture=0.75, objective_magnification=20.0,
                                  scan_id="sweeps")
    array_to_image(image, "rgb8", asked.image)
    calibrated = call(ros_node, estimate, asked)
    assert calibrated.success and calibrated.model_id.endswith("+calibrated") and calibrated.model_dir == answer.model_dir
    asked.step_above_um = 2.0
    array_to_image(image, "rgb8", asked.image_above)
    assert call(ros_node, estimate, asked).two_shot_model == answer.two_shot_model
    for other_scan in ("next-slide", ""):
        asked.scan_id = other_scan
        other = call(ros_node, estimate, asked)
        assert other.model_dir == str(tiny_model) and other.two_shot_model == answer.two_shot_model
    asked.objective_magnification = 40.0                     # no calibration for 40x: the base models answer
    base = call(ros_node, estimate, asked)
    assert base.model_dir == str(tiny_model) and base.two_shot_model == str(mismatched_two_shot_model)
    fitted_for_the_scan = (Path(answer.model_dir) / "metadata.json").stat().st_mtime_ns
    finished = call(ros_node, calibrate, CalibrateAutofocus.Request(scan_dir=str(scan_dir)), answer_wait_s=240.0)
    assert finished.success and not finished.error, finished.error
    assert finished.two_shot_model == answer.two_shot_model and finished.model_dir == "" and finished.sweeps == 3
    assert (Path(answer.model_dir) / "metadata.json").stat().st_mtime_ns == fitted_for_the_scan


# The node's module and what it runs per tile with its default backend ("auto"): the base model's estimate.
ESTIMATE_WITHOUT_TORCH = """
import sys
import numpy as np
import wsi_autofocus.node
from wsi_autofocus.calibration_store import CalibratedEstimators, CalibrationStore
estimators = CalibratedEstimators(CalibrationStore(sys.argv[1]), "auto")
image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
estimators.for_optics(20.0, 0.75, 0.325).estimate(image, 0.75, 0.325)
print(estimators.base.backend.name)
print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
"""


@pytest.mark.skipif(any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES), reason="a GPU backend may use torch")
def test_a_node_that_only_estimates_never_loads_torch(tmp_path):
    """torch is ~200 MB resident and absent from a Jetson's ONNX Runtime / TensorRT install: without a GPU
    the node estimates through ONNX Runtime, and only calibrating loads torch."""
    done = subprocess.run([sys.executable, "-c", ESTIMATE_WITHOUT_TORCH, str(tmp_path)], env=node_environment(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-2:] == ["onnxruntime", "[]"]


@pytest.mark.parametrize("declared, reason", [
    (("condenser_fill:=0.5", "condenser_inner_fill:=0.6"), "condenser fill 0.5, inner fill 0.6"),
    (("condenser_fill:=0.5", "condenser_numerical_aperture:=0.4"), "declare one")])
def test_a_condenser_that_cannot_be_is_refused_at_start_with_the_reason(declared, reason):
    arguments = [item for parameter in declared for item in ("-p", parameter)]
    done = subprocess.run([sys.executable, "-m", "wsi_autofocus.node", "--ros-args", *arguments],
                          env=node_environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "cannot start" in done.stderr and reason in done.stderr, done.stderr


def test_a_condenser_declared_by_its_na_fills_each_objective_by_that_objectives_na(run_nodes, ros_node, tiny_model):
    """One condenser setting for every objective: the single exposure and the pair of each objective are read
    with the fill its NA gives, as the core reads them with that fill declared."""
    condenser_na = DEFAULT_CONDENSER_FILL * 0.75
    run_nodes([NodeSpec(name="autofocus", package="wsi_autofocus", executable="autofocus_node",
                        module="wsi_autofocus.node", parameters={"model_dir": str(tiny_model), "backend": "auto",
                                                                 "condenser_numerical_aperture": condenser_na})])
    client = ros_node.create_client(EstimateFocus, "estimate_focus")
    assert client.wait_for_service(timeout_sec=30)
    microscope, pairs = VirtualMicroscope(seed=200), TwoShotModel.load(default_two_shot_path())
    estimator = FocusEstimator(load_backend("onnxruntime", tiny_model)[0], tiny_model)
    x, y = 43_000.0, 12_500.0
    for magnification in (20, 40):
        first, above = (microscope.capture(x, y, microscope.focal_z_um(x, y) + z, magnification, roi=(256, 256, 384, 384))
                        for z in (-3.0, -1.0))
        request = EstimateFocus.Request(pixel_size_um=first.pixel_size_um, numerical_aperture=first.numerical_aperture,
                                        step_above_um=2.0)
        array_to_image(first.image_rgb8, "rgb8", request.image)
        array_to_image(above.image_rgb8, "rgb8", request.image_above)
        fill = Condenser(min(condenser_na / first.numerical_aperture, 1.0))
        single = EstimateFocus.Request(pixel_size_um=first.pixel_size_um, numerical_aperture=first.numerical_aperture)
        single.image = request.image
        response = call(ros_node, client, single)
        assert response.success, response.error
        declared, undeclared = (estimator.estimate(first.image_rgb8, first.numerical_aperture, first.pixel_size_um,
                                                   condenser) for condenser in (fill, UNKNOWN_CONDENSER))
        assert response.defocus_um == pytest.approx(declared.defocus_um, abs=1e-4), magnification
        assert abs(declared.defocus_um - undeclared.defocus_um) > 1e-3
        response = call(ros_node, client, request)
        assert response.success, response.error
        expected = pairs.estimate(first.image_rgb8, above.image_rgb8, first.numerical_aperture, first.pixel_size_um,
                                  2.0, fill)
        assert response.defocus_um == pytest.approx(expected.defocus_um, abs=1e-4), magnification
