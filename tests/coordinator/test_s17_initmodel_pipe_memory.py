"""The starting model crosses initmodel's pipe (4a25b12) held once by the coordinator,
not twice: its output was collected whole (subprocess.run's capture_output) and then
loaded from those bytes into a second copy, so a 381 MB model took the coordinator to
792 MB at peak. The weights are now read straight into the array returned.

Real child process, real torch model of 50M parameters (about 190 MB of float32); the
coordinator side runs in a fresh interpreter so its peak RSS (ru_maxrss) is its own."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from fedge.coordinator.initmodel import _Counted, _read_npy

PARENT = """
import resource
from fedge.coordinator.initmodel import initial_weights_subprocess
from fedge.coordinator.plan import parse_plan
from tests.coordinator.test_initmodel import PLAN
plan = parse_plan(PLAN.format(model="cox_linear").replace("in_features = 5",
                                                          "in_features = 50_000_000"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w = initial_weights_subprocess(plan)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(w.nbytes, (after - before) * 1024, w.dtype, w.size)
"""


def test_the_coordinator_holds_a_large_starting_model_once_not_twice():
    proc = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    nbytes, growth, dtype, size = proc.stdout.split()
    assert dtype == "float32" and int(size) >= 50_000_000
    assert int(growth) < 1.3 * int(nbytes), (
        f"coordinator peak grew {int(growth) >> 20} MB for a {int(nbytes) >> 20} MB model")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(("data", "says"), [
    (_npy(np.arange(1000, dtype=np.float32))[:-10], "EOF: reading array data"),
    (b"not a model at all", "the magic string is not correct"),
    (b"", "EOF: reading magic string"),
    (_npy(np.array([{"a": 1}], dtype=object)), "Object arrays cannot be loaded"),
])
def test_output_that_is_not_a_whole_npy_array_is_refused_with_the_reason(data, says):
    with pytest.raises(ValueError, match=says):
        _read_npy(_Counted(io.BytesIO(data)))


def test_the_array_read_is_the_array_written_and_can_be_written_to():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    for sent in (array, np.asfortranarray(array)):
        stream = _Counted(io.BytesIO(_npy(sent) + b"trailing"))
        got = _read_npy(stream)
        assert np.array_equal(got, array) and got.flags.writeable
        assert stream.count == len(_npy(sent))
