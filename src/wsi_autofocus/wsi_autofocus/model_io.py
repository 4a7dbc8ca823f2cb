"""The focus model's interface, importable without torch (ONNX Runtime deployments need no torch):
its inputs, in order, the optics columns and the size of the context view."""

# Names of the model's inputs, in order, in every exported form (ONNX, TorchScript, TensorRT). `context` is
# the field of context_px(P) px around a P px patch averaged down CONTEXT_FACTOR times: the same size as the patch.
MODEL_INPUTS = ("patches", "context", "optics")
# Columns of the model's output, in every exported form: the distance from focus (µm, either side), its
# log variance, and the log-odds that the stage is above focus (defocus > 0).
MODEL_OUTPUTS = ("distance_um", "distance_log_variance", "above_focus_logit")
# Columns of the optics input: what every Tile and EstimateFocus request carries.
OPTICS_FEATURES = ("numerical_aperture", "pixel_size_um")
# The surroundings of a patch are seen over this many times its width, at 1/CONTEXT_FACTOR resolution.
CONTEXT_FACTOR = 2


def context_px(patch_px: int) -> int:
    """Side of the full-resolution field around a patch that the model's context view covers."""
    return CONTEXT_FACTOR * patch_px
