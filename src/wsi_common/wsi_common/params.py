"""Declaring node parameters up front, with descriptions, from one table per node."""
from rcl_interfaces.msg import ParameterDescriptor


def declare_parameters(node, spec: dict) -> dict:
    """Declare every parameter of `spec` ({name: (default, description)}) and return their values.

    The default's type is the parameter's type; a value of another type given on the command line
    is refused by rclpy with a clear error at start-up.
    """
    values = {}
    for name, (default, description) in spec.items():
        descriptor = ParameterDescriptor(description=description)
        values[name] = node.declare_parameter(name, default, descriptor).value
    return values
