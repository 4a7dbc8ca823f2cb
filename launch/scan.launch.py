"""ros2 launch wsi scan.launch.py [sim:=true] [slide:=0] [output_dir:=out] [record:=false] ...
   ros2 launch wsi scan.launch.py sim:=false mm_config:=scope.cfg [params_file:=scanner.yaml]   (a real microscope)

Builds the launch description from the graph in wsi.graph, the same one `wsi launch` runs.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from wsi.graph import LAUNCH_ARGUMENTS, GraphConfig, scan_graph
from wsi_common.ros_env import node_environment_defaults


def _nodes(context):
    values = {name: LaunchConfiguration(name).perform(context) for name in LAUNCH_ARGUMENTS}
    return [
        Node(package=spec.package, executable=spec.executable, name=spec.name if spec.single_node else None,
             namespace=spec.namespace or None, parameters=[*spec.parameter_files, spec.parameters],
             remappings=list(spec.remappings), output="screen", emulate_tty=True,
             # The Fast DDS profile for a sender or a receiver of images, and the other node defaults,
             # unless the user already set them.
             additional_env={name: value for name, value in node_environment_defaults(spec.sends_images).items()
                             if name not in os.environ})
        for spec in scan_graph(GraphConfig.from_strings(values))
    ]


def generate_launch_description():
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=default, description=description)
          for name, (default, description) in LAUNCH_ARGUMENTS.items()),
        OpaqueFunction(function=_nodes),
    ])
