"""ROS adapters shared by every WSI node: sensor_msgs/Image to numpy, QoS, Fast DDS profile."""
