"""sensor_msgs/Image <-> numpy without per-element copies.

Reading returns a view on the message buffer (zero-copy). Writing fills one `array.array('B')`
through a numpy view (one memcpy), which rclpy serialises without converting element by element.
The functions only touch the message's fields, so they work on any object with the Image fields.
"""
import array
import sys
from typing import NamedTuple

import numpy as np


class PixelFormat(NamedTuple):
    dtype: np.dtype
    channels: int


PIXEL_FORMATS = {
    "rgb8": PixelFormat(np.dtype(np.uint8), 3),
    "bgr8": PixelFormat(np.dtype(np.uint8), 3),
    "mono8": PixelFormat(np.dtype(np.uint8), 1),
    "mono16": PixelFormat(np.dtype(np.uint16), 1),
}

_HOST_IS_BIG_ENDIAN = sys.byteorder == "big"


class ImageConversionError(ValueError):
    """An image message or array does not match its declared encoding, size or step."""


def pixel_format(encoding: str) -> PixelFormat:
    try:
        return PIXEL_FORMATS[encoding]
    except KeyError:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; expected one of {sorted(PIXEL_FORMATS)}"
        ) from None


def image_to_array(msg) -> np.ndarray:
    """Return the pixels of an Image message as a read-only (H, W, C) or (H, W) array view.

    Row padding (`step` larger than a packed row) is skipped by striding, not copied away.
    """
    fmt = pixel_format(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image size {width}x{height} px; expected a positive width and height")
    row_bytes = width * fmt.channels * fmt.dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"image step {step} B is shorter than a {msg.encoding} row of {width} px ({row_bytes} B)")
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size != step * height:
        raise ImageConversionError(
            f"image data has {buffer.size} B; expected step*height = {step}*{height} = {step * height} B")
    dtype = fmt.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    rows = buffer.reshape(height, step)[:, :row_bytes]
    pixels = rows.view(dtype)
    shape = (height, width, fmt.channels) if fmt.channels > 1 else (height, width)
    return pixels.reshape(shape)


def array_to_image(pixels: np.ndarray, encoding: str, msg):
    """Fill `msg` (a sensor_msgs/Image, possibly reused between frames) with `pixels`; return it.

    The message's data buffer is reused when it already has the right size, so publishing a
    stream of same-size frames allocates nothing per frame.
    """
    fmt = pixel_format(encoding)
    pixels = np.asarray(pixels)
    expected_ndim = 3 if fmt.channels > 1 else 2
    if pixels.ndim == 3 and fmt.channels == 1 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim != expected_ndim or (fmt.channels > 1 and pixels.shape[2] != fmt.channels):
        raise ImageConversionError(
            f"array of shape {pixels.shape} cannot be encoded as {encoding}; expected "
            + ("(H, W, 3)" if fmt.channels == 3 else "(H, W)"))
    if pixels.dtype != fmt.dtype:
        raise ImageConversionError(f"array of dtype {pixels.dtype} cannot be encoded as {encoding}; "
                                   f"expected {fmt.dtype}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ImageConversionError(f"array of shape {pixels.shape} is empty")
    step = width * fmt.channels * fmt.dtype.itemsize
    size = step * height
    if not isinstance(msg.data, array.array) or msg.data.typecode != "B" or len(msg.data) != size:
        # The generated setter copies what it is given, so fill the buffer the message keeps.
        msg.data = array.array("B", bytes(size))
    view = np.frombuffer(msg.data, dtype=fmt.dtype).reshape(pixels.shape)
    np.copyto(view, pixels)
    msg.height, msg.width, msg.step = height, width, step
    msg.encoding = encoding
    msg.is_bigendian = _HOST_IS_BIG_ENDIAN
    return msg


def to_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """View or convert decoded pixels as RGB (H, W, 3); bgr8 is a strided view, mono is broadcast."""
    fmt = pixel_format(encoding)
    if encoding == "rgb8":
        return pixels
    if encoding == "bgr8":
        return pixels[:, :, ::-1]
    if fmt.dtype.itemsize > 1:
        pixels = (pixels >> 8).astype(np.uint8)
    return np.broadcast_to(pixels[:, :, None], pixels.shape + (3,))
