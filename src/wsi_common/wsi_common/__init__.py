"""Shared by every WSI package: ROS adapters (sensor_msgs/Image to numpy, QoS, parameters, node entry point,
Fast DDS profile) and the focus measures (`focus_metrics`)."""
