"""The microscope's lifecycle through its real process and the bring-up manager: the stage, camera and scan
interfaces exist exactly while it is active, and a hardware fault takes it down where a robot sees it and
brings it back with the manager's startup."""
import time

import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import State, Transition, TransitionEvent
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from std_srvs.srv import Trigger

from wsi.client import ScannerClient, ScannerUnavailable, TaskResult
from wsi.graph import GraphConfig, scan_graph
from wsi.lifecycle_manager import TO_ACTIVE, TO_UNCONFIGURED, BringUpError, transitions
from wsi_common.service_caller import ANSWER_WAIT_S, query
from wsi_common.topics import DIAGNOSTICS
from wsi_interfaces.action import MoveStage

FAULT = "X axis following error"


def test_the_manager_plans_the_transitions_from_every_state():
    def state(state_id, label):
        return State(id=state_id, label=label)

    unconfigured = state(State.PRIMARY_STATE_UNCONFIGURED, "unconfigured")
    active = state(State.PRIMARY_STATE_ACTIVE, "active")
    assert transitions(TO_ACTIVE, unconfigured, "m") == (Transition.TRANSITION_CONFIGURE,
                                                         Transition.TRANSITION_ACTIVATE)
    assert transitions(TO_ACTIVE, active, "m") == ()
    assert transitions(TO_UNCONFIGURED, active, "m") == (Transition.TRANSITION_DEACTIVATE,
                                                         Transition.TRANSITION_CLEANUP)
    with pytest.raises(BringUpError, match="m is finalized: it has shut down; restart its process"):
        transitions(TO_ACTIVE, state(State.PRIMARY_STATE_FINALIZED, "finalized"), "m")
    with pytest.raises(BringUpError, match="m is configuring: a transition is under way"):
        transitions(TO_ACTIVE, state(State.TRANSITION_STATE_CONFIGURING, "configuring"), "m")


class Robot:
    """What a lab robot uses to watch and drive the scanner: the manager's services, the microscope's
    lifecycle services and transition events, /diagnostics."""

    def __init__(self, node):
        self.node = node
        self.events, self.diagnostics = [], []
        node.create_subscription(TransitionEvent, "microscope/transition_event", self.events.append, 10)
        DIAGNOSTICS.subscription(node, lambda a: self.diagnostics.extend(
            s for s in a.status if s.name == "/microscope"))

    def call(self, service_type, name: str, request, timeout_s: float = 120.0, asked_again: bool = True):
        """The answer; a query (`asked_again`) is asked again when its answer is lost, a transition is not."""
        client = self.node.create_client(service_type, name)
        assert client.wait_for_service(timeout_sec=60), f"no {name}"
        answer = query(client, request, timeout_s, node=self.node,
                       answer_wait_s=ANSWER_WAIT_S if asked_again else timeout_s)
        assert answer is not None, f"{name} did not answer"
        self.node.destroy_client(client)
        return answer

    def manager(self, service: str) -> Trigger.Response:
        return self.call(Trigger, f"lifecycle_manager/{service}", Trigger.Request())

    def state(self) -> str:
        return self.call(GetState, "microscope/get_state", GetState.Request()).current_state.label

    def transition(self, transition: int) -> bool:
        return self.call(ChangeState, "microscope/change_state",
                         ChangeState.Request(transition=Transition(id=transition)), asked_again=False).success

    def set_stage_fault(self, fault: str) -> None:
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=fault)
        response = self.call(SetParameters, "microscope/set_parameters",
                             SetParameters.Request(parameters=[Parameter(name="sim_stage_fault", value=value)]))
        assert response.results[0].successful, response.results[0].reason

    def wait_for(self, condition, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            rclpy.spin_once(self.node, timeout_sec=0.1)

    def node_names(self) -> set[str]:
        return set(self.node.get_node_names())


def move(scanner: ScannerClient, x_um: float, y_um: float) -> TaskResult:
    assert scanner.move_stage(x_um, y_um, 0.0)
    while not scanner.is_task_complete():
        pass
    return scanner.result().status


@pytest.fixture
def scanner(ros_node):
    client = ScannerClient(server_timeout_s=60.0)
    yield client
    client.destroy_node()


def microscope_graph(autostart: bool):
    graph = [spec for spec in scan_graph(GraphConfig(sim_speedup=20.0))
             if spec.name in ("microscope", "lifecycle_manager")]
    graph[0].parameters.update(camera_width_px=256, camera_height_px=256, diagnostics_period_s=0.5)
    graph[1].parameters["autostart"] = autostart
    return graph


@pytest.mark.ros
def test_configure_activate_deactivate_cleanup(run_nodes, ros_node, scanner):
    run_nodes(microscope_graph(autostart=False))
    robot = Robot(ros_node)
    assert robot.state() == "unconfigured"
    robot.wait_for(lambda: robot.diagnostics, "diagnostics")
    assert robot.diagnostics[-1].level == DiagnosticStatus.WARN and "unconfigured" in robot.diagnostics[-1].message
    assert not robot.manager("is_active").success

    assert robot.transition(Transition.TRANSITION_CONFIGURE) and robot.state() == "inactive"
    time.sleep(1.0)         # long enough for a node to be discovered: none of the hardware nodes is there
    assert not {"stage", "camera", "scan_orchestrator"} & robot.node_names()

    started = robot.manager("startup")
    assert started.success and started.message == "active: microscope", started.message
    assert robot.state() == "active" and robot.manager("is_active").success
    assert move(scanner, 20_000.0, 5_000.0) is TaskResult.SUCCEEDED

    assert robot.transition(Transition.TRANSITION_DEACTIVATE) and robot.state() == "inactive"
    robot.wait_for(lambda: not {"stage", "camera", "scan_orchestrator"} & robot.node_names(), "hardware nodes gone")
    inactive = robot.manager("is_active")
    assert not inactive.success and inactive.message.startswith("microscope is inactive"), inactive.message
    reset = robot.manager("reset")
    assert reset.success and robot.state() == "unconfigured", reset.message
    assert [(e.start_state.label, e.goal_state.label) for e in robot.events][-4:] == [
        ("active", "deactivating"), ("deactivating", "inactive"), ("inactive", "cleaningup"),
        ("cleaningup", "unconfigured")]


@pytest.mark.ros
def test_a_stage_fault_takes_the_microscope_down_and_startup_brings_it_back(run_nodes, ros_node, scanner):
    run_nodes(microscope_graph(autostart=True))
    robot = Robot(ros_node)
    # The manager brings the microscope up by itself: the stage action appears. A move that is still running
    # when the fault comes: its client gets its result all the same.
    assert scanner.move_stage(1_000.0, 0.0, 0.0, relative=True, axes=MoveStage.Goal.AXES_X, speed_um_s=5.0)
    while scanner.feedback() is None:
        assert not scanner.is_task_complete(), scanner.result()

    robot.set_stage_fault(FAULT)
    while not scanner.is_task_complete():
        pass
    assert scanner.result().status is TaskResult.CANCELED
    robot.wait_for(lambda: robot.state() == "unconfigured", "unconfigured after the fault")
    assert ("deactivating", "errorprocessing") in [(e.start_state.label, e.goal_state.label) for e in robot.events]
    robot.wait_for(lambda: {v.key: v.value for v in robot.diagnostics[-1].values}["lifecycle_state"] == "unconfigured",
                   "diagnostics from the unconfigured microscope")
    assert robot.diagnostics[-1].level == DiagnosticStatus.ERROR
    assert robot.diagnostics[-1].message == f"hardware fault: {FAULT}"
    down = robot.manager("is_active")
    assert not down.success and down.message == f"microscope is unconfigured: hardware fault: {FAULT}"
    scanner.server_timeout_s = 2.0
    with pytest.raises(ScannerUnavailable, match=f"no stage/move action server after 2 s: the scanner is not "
                                                 f"active: microscope is unconfigured: hardware fault: {FAULT}"):
        scanner.move_stage(20_000.0, 5_000.0, 0.0)
    scanner.server_timeout_s = 60.0

    refused = robot.manager("startup")      # the stage still reports its fault: it does not connect
    assert not refused.success and refused.message == f"microscope did not configure: configure failed: {FAULT}"
    robot.set_stage_fault("")
    assert robot.manager("startup").success and robot.state() == "active"
    assert move(scanner, 20_000.0, 5_000.0) is TaskResult.SUCCEEDED
