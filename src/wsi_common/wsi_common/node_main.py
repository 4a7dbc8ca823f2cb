"""Process entry point shared by every WSI node: init, spin, clean shutdown on Ctrl-C or SIGTERM."""
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor


class NodeConfigurationError(ValueError):
    """A node cannot start with the parameters it was given."""


def spin_nodes(make_nodes, name: str, args=None, make_executor=SingleThreadedExecutor) -> None:
    """Run the nodes `make_nodes()` creates until Ctrl-C/SIGTERM; exit 0, or 2 with a one-line
    reason if they cannot start.

    rclpy's own signal handlers (SIGINT and SIGTERM) wake the executor and shut the context down,
    which ends the spin with ExternalShutdownException.
    """
    rclpy.init(args=args)
    exit_code = 0
    nodes = []
    try:
        nodes = make_nodes()
        executor = make_executor()
        for node in nodes:
            executor.add_node(node)
        executor.spin()
    except (ExternalShutdownException, KeyboardInterrupt):
        pass
    except NodeConfigurationError as error:
        print(f"{name}: cannot start: {error}", file=sys.stderr)
        exit_code = 2
    except Exception:
        if rclpy.ok():
            raise
        # Ctrl-C/SIGTERM arrived while the nodes were being created: a clean stop, not a crash.
    finally:
        for node in reversed(nodes):
            node.destroy_node()
        rclpy.try_shutdown()
    sys.exit(exit_code)


def spin_node(node_class, args=None, make_executor=SingleThreadedExecutor) -> None:
    """Run one node of `node_class` (see spin_nodes)."""
    spin_nodes(lambda: [node_class()], node_class.__name__, args, make_executor)
