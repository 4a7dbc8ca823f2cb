"""`python -m wsi_common.run_node MODULE [ARGS...]`: run a node module as `__main__`, the way the
supervisor starts every node.

A Ctrl-C that lands while the module is still importing (numpy, scipy, rclpy's C extension) can
surface as an ImportError caused by the KeyboardInterrupt, which would exit with code 1 and read as a
crash. Here any exception caused by a KeyboardInterrupt ends the process the way Python ends on an
uncaught Ctrl-C: killed by SIGINT, which the supervisor counts as a clean stop.
"""
import os
import runpy
import signal
import sys


def caused_by_interrupt(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m wsi_common.run_node MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except BaseException as error:
        if not caused_by_interrupt(error):
            raise
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    main()
