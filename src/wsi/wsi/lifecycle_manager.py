"""Bring-up manager: takes a scanner's managed (lifecycle) nodes to active, in order, and back down.

Parameters: `node_names`, the managed nodes in bring-up order (the graph, wsi.graph, lists them), and
`autostart` (bring them up as soon as they answer). Services (std_srvs/Trigger) under the manager's name,
for a lab robot or an operator:

    lifecycle_manager/startup    configure and activate every node, in order; also the way back after a fault
    lifecycle_manager/reset      deactivate and clean up every node, in reverse order (the hardware is released)
    lifecycle_manager/is_active  success when every node is active; the message names any that is not, and why

The answer to a failed transition, and a node that leaves active by itself (a hardware fault), carry the
reason the node gives on /diagnostics. The manager calls the nodes' standard lifecycle services, so
`ros2 lifecycle set <node> configure` and friends work beside it.
"""
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State, Transition, TransitionEvent
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from std_srvs.srv import Trigger

from wsi_common.executors import PoolExecutor
from wsi_common.node_main import NodeConfigurationError, spin_node
from wsi_common.params import declare_parameters
from wsi_common.service_caller import ANSWER_WAIT_S, answered_by_another_thread, query
from wsi_common.topics import DIAGNOSTICS

PARAMETERS = {
    "node_names": ([""], "managed nodes, in bring-up order (names relative to the manager's namespace)"),
    "autostart": (True, "bring every node up when the manager starts"),
    "service_timeout_s": (120.0, "how long to wait for a node's lifecycle services to appear"),
    "transition_timeout_s": (120.0, "how long one transition may take (connecting to hardware can be slow)"),
}

# The transitions from each primary state to active, and to unconfigured.
TO_ACTIVE = {State.PRIMARY_STATE_UNCONFIGURED: (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE),
             State.PRIMARY_STATE_INACTIVE: (Transition.TRANSITION_ACTIVATE,),
             State.PRIMARY_STATE_ACTIVE: ()}
TO_UNCONFIGURED = {State.PRIMARY_STATE_ACTIVE: (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP),
                   State.PRIMARY_STATE_INACTIVE: (Transition.TRANSITION_CLEANUP,),
                   State.PRIMARY_STATE_UNCONFIGURED: ()}
TRANSITION_LABELS = {Transition.TRANSITION_CONFIGURE: "configure", Transition.TRANSITION_ACTIVATE: "activate",
                     Transition.TRANSITION_DEACTIVATE: "deactivate", Transition.TRANSITION_CLEANUP: "cleanup"}
# Where a node that made each transition rests.
TRANSITION_GOALS = {Transition.TRANSITION_CONFIGURE: State.PRIMARY_STATE_INACTIVE,
                    Transition.TRANSITION_ACTIVATE: State.PRIMARY_STATE_ACTIVE,
                    Transition.TRANSITION_DEACTIVATE: State.PRIMARY_STATE_INACTIVE,
                    Transition.TRANSITION_CLEANUP: State.PRIMARY_STATE_UNCONFIGURED}
# The primary states other than active: where a node that leaves active comes to rest.
RESTING_STATES = (State.PRIMARY_STATE_UNCONFIGURED, State.PRIMARY_STATE_INACTIVE, State.PRIMARY_STATE_FINALIZED)
# After a failed transition, how long to wait for the node's /diagnostics to say why.
REASON_WAIT_S = 1.0


class BringUpError(RuntimeError):
    """A managed node did not answer, or did not make a transition; the message names the node and why."""


def transitions(plan: dict, state: State, node: str) -> tuple[int, ...]:
    """The transitions that take `node` from `state` to the plan's goal."""
    if state.id not in plan:
        raise BringUpError(f"{node} is {state.label}: " + (
            "it has shut down; restart its process" if state.id == State.PRIMARY_STATE_FINALIZED
            else "a transition is under way; try again when it has ended"))
    return plan[state.id]


class LifecycleManager(Node):
    def __init__(self):
        super().__init__("lifecycle_manager")
        self.params = p = declare_parameters(self, PARAMETERS)
        self.names = [name for name in p["node_names"] if name]
        if not self.names:
            raise NodeConfigurationError("node_names is empty; expected the managed nodes, in bring-up order")
        namespace = self.get_namespace().rstrip("/")
        self._full_names = {name: f"{namespace}/{name}" for name in self.names}
        # Requests wait on answers: the answers arrive on other executor threads (a reentrant group), while
        # requests run one at a time (so that startup and reset never interleave).
        answers, requests = ReentrantCallbackGroup(), MutuallyExclusiveCallbackGroup()
        self._get_state = {name: self.create_client(GetState, f"{name}/get_state", callback_group=answers)
                           for name in self.names}
        self._change_state = {name: self.create_client(ChangeState, f"{name}/change_state", callback_group=answers)
                              for name in self.names}
        self._changing: set[str] = set()        # nodes the manager is taking through a transition right now
        self._active: set[str] = set()          # nodes whose last transition event ended in active
        self._statuses: dict[str, tuple[float, str]] = {}    # full node name -> (arrival, diagnostics message)
        self._status_arrived = threading.Condition()
        DIAGNOSTICS.subscription(self, self._on_diagnostics, callback_group=answers)
        for name in self.names:
            self.create_subscription(TransitionEvent, f"{name}/transition_event",
                                     lambda event, name=name: self._on_transition_event(name, event), 10,
                                     callback_group=answers)
        self.create_service(Trigger, "~/startup", self._serve(self.startup), callback_group=requests)
        self.create_service(Trigger, "~/reset", self._serve(self.reset), callback_group=requests)
        self.create_service(Trigger, "~/is_active", self._serve(self.is_active), callback_group=requests)
        if p["autostart"]:
            self._autostart = self.create_timer(0.0, self._start_once, callback_group=requests)

    # -- what the services do ------------------------------------------------------------------
    def startup(self) -> str:
        for name in self.names:
            for transition in transitions(TO_ACTIVE, self.state(name), name):
                self.change_state(name, transition)
        return f"active: {', '.join(self.names)}"

    def reset(self) -> str:
        for name in reversed(self.names):
            for transition in transitions(TO_UNCONFIGURED, self.state(name), name):
                self.change_state(name, transition)
        return f"unconfigured (hardware released): {', '.join(self.names)}"

    def is_active(self) -> str:
        inactive = []
        for name in self.names:
            state = self.state(name)
            if state.id != State.PRIMARY_STATE_ACTIVE:
                inactive.append(f"{name} is {state.label}{self._reason(name)}")
        if inactive:
            raise BringUpError("; ".join(inactive))
        return f"active: {', '.join(self.names)}"

    def _serve(self, action):
        def callback(request, response):
            try:
                response.success, response.message = True, action()
            except BringUpError as error:
                response.success, response.message = False, str(error)
            return response
        return callback

    def _start_once(self) -> None:
        self._autostart.cancel()
        try:
            self.get_logger().info(f"bring-up: {self.startup()}")
        except BringUpError as error:
            self.get_logger().error(f"bring-up failed: {error}; the service lifecycle_manager/startup tries again")

    # -- the managed nodes' lifecycle services -------------------------------------------------
    def _wait_for(self, client) -> None:
        if not client.wait_for_service(timeout_sec=self.params["service_timeout_s"]):
            raise BringUpError(f"no {client.srv_name} service within {self.params['service_timeout_s']:g} s "
                               "(is the node's process running?)")

    def state(self, name: str) -> State:
        """The node's current state; the query is asked again when its answer is lost."""
        client = self._get_state[name]
        self._wait_for(client)
        answer = query(client, GetState.Request(), self.params["service_timeout_s"])
        if answer is None:
            raise BringUpError(f"{name} state: no answer within {self.params['service_timeout_s']:g} s")
        return answer.current_state

    def change_state(self, name: str, transition: int) -> None:
        label = TRANSITION_LABELS[transition]
        asked = time.monotonic()
        client = self._change_state[name]
        self._wait_for(client)
        self._changing.add(name)
        try:
            future = client.call_async(ChangeState.Request(transition=Transition(id=transition)))
            # A lost answer (wsi_common.service_caller) is found out by asking the node's state.
            while not answered_by_another_thread(future, ANSWER_WAIT_S):
                if self.state(name).id == TRANSITION_GOALS[transition]:
                    self.get_logger().warning(f"{name}: {label} done (its answer was lost; its state says so)")
                    return
                if time.monotonic() - asked > self.params["transition_timeout_s"]:
                    raise BringUpError(f"{name} {label}: no answer within {self.params['transition_timeout_s']:g} s")
        finally:
            self._changing.discard(name)
        if not future.result().success:
            raise BringUpError(f"{name} did not {label}{self._reason(name, newer_than=asked)}")
        self.get_logger().info(f"{name}: {label} done")

    # -- what the nodes report -----------------------------------------------------------------
    def _on_diagnostics(self, array: DiagnosticArray) -> None:
        with self._status_arrived:
            for status in array.status:
                self._statuses[status.name] = (time.monotonic(), status.message)
            self._status_arrived.notify_all()

    def _reason(self, name: str, newer_than: float = 0.0) -> str:
        """': <the node's diagnostics message>', waiting up to REASON_WAIT_S for one newer than `newer_than`."""
        full_name = self._full_names[name]
        with self._status_arrived:
            self._status_arrived.wait_for(lambda: self._statuses.get(full_name, (0.0, ""))[0] > newer_than,
                                          timeout=REASON_WAIT_S)
            message = self._statuses.get(full_name, (0.0, ""))[1]
        return f": {message}" if message else ""

    def _on_transition_event(self, name: str, event: TransitionEvent) -> None:
        """Report a node that was active and came to rest in another state without the manager asking."""
        if event.goal_state.id == State.PRIMARY_STATE_ACTIVE:
            self._active.add(name)
        elif event.goal_state.id in RESTING_STATES and name in self._active:
            self._active.discard(name)
            if name not in self._changing:
                self.get_logger().error(f"{name} left active: now {event.goal_state.label}{self._reason(name)}; "
                                        "the service lifecycle_manager/startup brings it back")


def main(args=None):
    spin_node(LifecycleManager, args, make_executor=lambda: PoolExecutor(num_threads=4))


if __name__ == "__main__":
    main()
