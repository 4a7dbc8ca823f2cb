import subprocess
import sys

import pytest

# Minor page faults of making and dropping four 16 MB arrays at once, ten times (as a render does with
# its frame-sized temporaries), after keep_freed_memory() or not.
FAULTS = """
import resource, sys
import numpy as np
from wsi_common.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def frame():
    temporaries = [np.ones(4 * 2 ** 20, dtype=np.float32) for _ in range(4)]

frame()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    frame()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ARRAY = 16 * 2 ** 20 // 4096


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_faults_no_pages_in_again_for_the_next_frame():
    assert page_faults("default") > PAGES_PER_ARRAY       # trimmed heap: arrays faulted in anew
    assert page_faults("keep") < PAGES_PER_ARRAY / 40
