"""Ending a process's DDS participant without Fast DDS 3.2.3's teardown livelock.

rmw_fastrtps deletes the process's participant with its last node, and first detaches the participant's discovery
listener: `DomainParticipant::set_listener(nullptr)`, which waits, with no time limit, for the discovery callbacks
running on Fast DDS's receive threads to end. In Fast DDS 3.2.3 that unlimited wait never waits: its deadline (the
steady clock's maximum) overflows when converted to the system clock, so each `pthread_cond_timedwait` gets a
negative time and returns EINVAL at once without releasing the listener's mutex (seen in gdb), and the main thread
spins holding it. A callback running at that moment needs the mutex to end, so the process spins on one core
forever. Callbacks run when another participant removes an endpoint or leaves: when the graph's processes stop
together. Measured with `bench/dds_teardown.py` (six processes stopping at once, 100 times): 5 of 600 teardowns
hung with rclpy's own node destruction, 0 of 600 with the detach below.

The same call with a finite time limit waits as it should (the mutex is released while waiting): the callback
ends, the listener is detached, and rmw's own call then returns at once. The call is made through the
C++ symbols of the ros-fastdds and ros-rmw-fastrtps-cpp wheels pinned in `constraints.txt`, which rclpy has
loaded. A process killed instead leaves its participant's shared memory in /dev/shm (`wsi_common.fastdds_shm`).
"""
import ctypes
from functools import cache

from rclpy.exceptions import InvalidHandle
from rclpy.node import Node
from rclpy.utilities import get_rmw_implementation_identifier

FASTDDS_RMW = "rmw_fastrtps_cpp"
# Longer than any discovery callback takes (microseconds; milliseconds on a loaded machine).
DETACH_TIMEOUT_S = 5
_RETCODE_OK = 0
# (library, symbol): rcl_node_get_rmw_handle(const rcl_node_t *);
# rmw_fastrtps_cpp::get_domain_participant(rmw_node_t *);
# eprosima::fastdds::dds::DomainParticipant::set_listener(DomainParticipantListener *, std::chrono::seconds).
_RMW_HANDLE = ("librcl.so", "rcl_node_get_rmw_handle")
_PARTICIPANT = ("librmw_fastrtps_cpp.so", "_ZN16rmw_fastrtps_cpp22get_domain_participantEP10rmw_node_s")
_SET_LISTENER = ("libfastdds.so.3.2", "_ZN8eprosima7fastdds3dds17DomainParticipant12set_listenerE"
                                      "PNS1_25DomainParticipantListenerENSt6chrono8durationIlSt5ratioILl1ELl1EEEE")


class DetachError(RuntimeError):
    """The participant's discovery listener was not detached: deleting the participant may hang."""


@cache
def _function(library: str, symbol: str, restype, *argtypes):
    # The libraries are rclpy's, already loaded: dlopen finds them by their soname.
    try:
        function = getattr(ctypes.CDLL(library), symbol)
    except (OSError, AttributeError) as error:
        raise DetachError(f"{symbol} is not in the loaded {library} ({error}); the detach knows the libraries of "
                          f"the ros-fastdds and ros-rmw-fastrtps-cpp wheels pinned in constraints.txt") from error
    function.restype = restype
    function.argtypes = argtypes
    return function


def detach_discovery_listener(node: Node, timeout_s: int = DETACH_TIMEOUT_S) -> None:
    """Detach the discovery listener of the DDS participant that `node` belongs to (the process's, shared by
    all its nodes in one context), waiting up to `timeout_s` for a callback running in it to end. Call it
    just before the participant is deleted (the context's last node destroyed): the process's graph no
    longer follows discovery once it returns. Nothing to detach when the middleware is not Fast DDS or the node
    is already destroyed (its context shut down, which destroys it). Raises DetachError."""
    if get_rmw_implementation_identifier() != FASTDDS_RMW:
        return
    rmw_handle = _function(*_RMW_HANDLE, ctypes.c_void_p, ctypes.c_void_p)
    participant = _function(*_PARTICIPANT, ctypes.c_void_p, ctypes.c_void_p)
    set_listener = _function(*_SET_LISTENER, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long)
    try:
        with node.handle:       # the node cannot be destroyed while its rcl handle is used
            code = set_listener(participant(rmw_handle(node.handle.pointer)), None, timeout_s)
    except InvalidHandle:
        return
    if code != _RETCODE_OK:
        raise DetachError(f"a discovery callback was still running {timeout_s} s later (return code {code})")
