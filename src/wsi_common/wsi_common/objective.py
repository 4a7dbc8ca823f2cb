"""The objective a scanner uses when nothing names one: the orchestrator for a goal that gives 0, a microscope
when it starts, and the simulated scanners, scans and benchmarks that describe a typical scan."""

# 20x (about 0.25-0.5 µm per pixel) resolves nuclear detail and is the usual objective of bright-field slide
# scanning; 40x takes four times as many tiles.
DEFAULT_OBJECTIVE_MAGNIFICATION = 20.0
