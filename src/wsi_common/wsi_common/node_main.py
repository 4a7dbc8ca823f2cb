"""Process entry point shared by every WSI node: init, spin, clean shutdown on Ctrl-C or SIGTERM."""
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor


class NodeConfigurationError(ValueError):
    """A node cannot start with the parameters it was given."""


def spin_node(node_class, args=None, make_executor=SingleThreadedExecutor) -> None:
    """Run one node until Ctrl-C/SIGTERM; exit 0, or 2 with a one-line reason if it cannot start.

    rclpy's own signal handlers (SIGINT and SIGTERM) wake the executor and shut the context down,
    which ends the spin with ExternalShutdownException.
    """
    rclpy.init(args=args)
    exit_code = 0
    node = None
    try:
        node = node_class()
        executor = make_executor()
        executor.add_node(node)
        executor.spin()
    except (ExternalShutdownException, KeyboardInterrupt):
        pass
    except NodeConfigurationError as error:
        print(f"{node_class.__name__}: cannot start: {error}", file=sys.stderr)
        exit_code = 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    sys.exit(exit_code)
