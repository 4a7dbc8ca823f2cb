"""Frame-sized temporaries without page faults.

glibc gives every freed block above its mmap threshold back to the kernel and returns the heap's free top
once it passes the trim threshold; the next frame-sized array is then faulted in again, page by page, and
two threads faulting at once wait on each other. A process that makes and drops such arrays all the time
(the simulated microscope renders a tile through a dozen of them) keeps them in its heap instead: its
resident memory stays at its high-water mark.
"""
import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit machines (half its heap size).
LARGEST_HEAP_BLOCK_BYTES = 32 * 2 ** 20


def keep_freed_memory() -> bool:
    """Serve blocks up to LARGEST_HEAP_BLOCK_BYTES from the heap and never trim it; False where the C
    library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
