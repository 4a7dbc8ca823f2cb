"""Shared by every WSI package: ROS adapters (sensor_msgs/Image to numpy, QoS, parameters, node entry point,
Fast DDS profile) and, ROS-free, the focus measures (`focus_metrics`), the tile grid (`tile_grid`), the files
of a scan (`scan_files`) and the default objective (`objective`)."""
