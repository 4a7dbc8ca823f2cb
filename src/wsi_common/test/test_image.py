import array

import numpy as np
import pytest
from sensor_msgs.msg import Image

from wsi_common.image import ImageConversionError, array_to_image, image_to_array, to_rgb


def random_pixels(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("encoding, shape, dtype", [
    ("rgb8", (5, 7, 3), np.uint8), ("bgr8", (4, 3, 3), np.uint8),
    ("mono8", (6, 5), np.uint8), ("mono16", (3, 9), np.uint16)])
def test_round_trip_is_exact(encoding, shape, dtype):
    pixels = random_pixels(shape, dtype)
    msg = array_to_image(pixels, encoding, Image())
    assert (msg.height, msg.width, msg.encoding) == (shape[0], shape[1], encoding)
    assert msg.step == shape[1] * pixels.itemsize * (shape[2] if len(shape) == 3 else 1)
    np.testing.assert_array_equal(image_to_array(msg), pixels)


def test_reading_is_a_view_on_the_message_buffer():
    msg = array_to_image(random_pixels((8, 8, 3), np.uint8), "rgb8", Image())
    view = image_to_array(msg)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))


def test_writing_reuses_a_buffer_of_the_right_size():
    msg = array_to_image(random_pixels((8, 8, 3), np.uint8), "rgb8", Image())
    buffer = msg.data
    second = random_pixels((8, 8, 3), np.uint8)[::-1].copy()
    array_to_image(second, "rgb8", msg)
    assert msg.data is buffer
    np.testing.assert_array_equal(image_to_array(msg), second)


def test_row_padding_in_step_is_skipped():
    pixels = random_pixels((4, 5, 3), np.uint8)
    padded = np.zeros((4, 20), np.uint8)
    padded[:, :15] = pixels.reshape(4, 15)
    padded[:, 15:] = 0xAB
    msg = Image(height=4, width=5, encoding="rgb8", step=20, data=array.array("B", padded.tobytes()))
    np.testing.assert_array_equal(image_to_array(msg), pixels)


def test_big_endian_mono16_is_decoded():
    pixels = random_pixels((3, 4), np.uint16)
    msg = Image(height=3, width=4, encoding="mono16", step=8, is_bigendian=True,
                data=array.array("B", pixels.astype(">u2").tobytes()))
    np.testing.assert_array_equal(image_to_array(msg), pixels)


@pytest.mark.parametrize("fields, message", [
    (dict(encoding="yuv422"), "unsupported image encoding 'yuv422'"),
    (dict(step=10), "step 10 B is shorter than a rgb8 row of 4 px (12 B)"),
    (dict(height=3), "expected step*height = 12*3 = 36 B"),
    (dict(width=0), "image size 0x2 px"),
])
def test_inconsistent_messages_are_refused_with_the_wrong_value(fields, message):
    base = dict(height=2, width=4, encoding="rgb8", step=12, data=array.array("B", bytes(24)))
    with pytest.raises(ImageConversionError, match=message.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")):
        image_to_array(Image(**{**base, **fields}))


def test_arrays_that_do_not_match_the_encoding_are_refused():
    with pytest.raises(ImageConversionError, match=r"shape \(4, 4\) cannot be encoded as rgb8"):
        array_to_image(np.zeros((4, 4), np.uint8), "rgb8", Image())
    with pytest.raises(ImageConversionError, match="dtype float32 cannot be encoded as mono8"):
        array_to_image(np.zeros((4, 4), np.float32), "mono8", Image())


def test_to_rgb_views_every_encoding_as_rgb():
    rgb = random_pixels((2, 3, 3), np.uint8)
    np.testing.assert_array_equal(to_rgb(rgb[:, :, ::-1], "bgr8"), rgb)
    mono16 = np.array([[0, 256 * 200 + 7]], np.uint16)
    np.testing.assert_array_equal(to_rgb(mono16, "mono16")[0, 1], [200, 200, 200])
