"""The focus model's interface, importable without torch (ONNX Runtime deployments need no torch):
its inputs, in order, the optics columns and the size of the context view."""

# Names of the model's inputs, in order, in every exported form (ONNX, TorchScript, TensorRT). `context` is
# the field of context_px(P) px around a P px patch averaged down CONTEXT_FACTOR times: the same size as the patch.
MODEL_INPUTS = ("patches", "context", "optics")
# Columns of the model's output, in every exported form: the distance from focus (µm, either side), its
# log variance, and the log-odds that the stage is above focus (defocus > 0).
MODEL_OUTPUTS = ("distance_um", "distance_log_variance", "above_focus_logit")
# Columns of the optics input: the objective's NA and the pixel size, which every Tile and EstimateFocus request
# carries, and the condenser the scanner declares (`two_shot.Condenser`: fractions of the objective NA); 0 = unknown.
OPTICS_FEATURES = ("numerical_aperture", "pixel_size_um", "condenser_fill", "condenser_inner_fill")
CONDENSER_COLUMNS = slice(OPTICS_FEATURES.index("condenser_fill"), OPTICS_FEATURES.index("condenser_inner_fill") + 1)
# Shares of training samples shown as a caller that sends no optics (all columns 0) and, besides those, as a
# scanner that declares no condenser (its columns 0), so that "unknown" still gets an answer.
UNKNOWN_OPTICS_FRACTION = 0.15
UNKNOWN_CONDENSER_FRACTION = 0.35
# The surroundings of a patch are seen over this many times its width, at 1/CONTEXT_FACTOR resolution.
CONTEXT_FACTOR = 2


def context_px(patch_px: int) -> int:
    """Side of the full-resolution field around a patch that the model's context view covers."""
    return CONTEXT_FACTOR * patch_px
