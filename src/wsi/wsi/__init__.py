"""Bring-up: the WSI node graph, scan.launch.py, launcher, scan client, recording and replay."""
