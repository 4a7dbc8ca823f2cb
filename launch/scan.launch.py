"""ros2 launch wsi scan.launch.py [sim:=true] [slide:=0] [output_dir:=out] [record:=false] ...
   ros2 launch wsi scan.launch.py sim:=false mm_config:=scope.cfg [params_file:=scanner.yaml]   (a real microscope)

Builds the launch description from the graph in wsi.graph, the same one `wsi launch` runs.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

from wsi.graph import LAUNCH_ARGUMENTS, GraphConfig, scan_graph
from wsi_common.ros_env import fastdds_profile_path


def _nodes(context):
    values = {name: LaunchConfiguration(name).perform(context) for name in LAUNCH_ARGUMENTS}
    return [
        Node(package=spec.package, executable=spec.executable, name=spec.name if spec.single_node else None,
             namespace=spec.namespace or None, parameters=[*spec.parameter_files, spec.parameters],
             remappings=list(spec.remappings), output="screen", emulate_tty=True)
        for spec in scan_graph(GraphConfig.from_strings(values))
    ]


def generate_launch_description():
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=default, description=description)
          for name, (default, description) in LAUNCH_ARGUMENTS.items()),
        # Large shared-memory segments for tiles, unless the user already chose a profile.
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", EnvironmentVariable(
            "FASTDDS_DEFAULT_PROFILES_FILE", default_value=str(fastdds_profile_path()))),
        OpaqueFunction(function=_nodes),
    ])
