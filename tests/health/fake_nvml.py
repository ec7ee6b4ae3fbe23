"""A fake NVML installed at nvidia-ml-py's function level (``pynvml.nvml*``).

This is the boundary that cannot exist here (no NVIDIA driver): everything in
``fedge.health`` above it runs for real. Each fake GPU is a dict of metric →
value, where a value that is an exception instance is raised instead, so a test
can make one metric NotSupported or fail with any NVML error.
"""

from __future__ import annotations

import queue
import time
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

GiB = 2**30


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED


def gpu(**overrides: Any) -> dict[str, Any]:
    """A healthy H100 SXM as NVML reports it (raw NVML units: mW, bytes, bit masks)."""
    base: dict[str, Any] = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-5a1c2e0b-7c1d-4f7e-9a51-3d2b9f3c8e11",
        "temperature": 41,
        "slowdown_temp": 90,
        "shutdown_temp": 92,
        "power": 118_456,
        "power_limit": 700_000,
        "memory": SimpleNamespace(total=85_520_809_984, used=562_954_240, free=84_957_855_744),
        "utilization": SimpleNamespace(gpu=0, memory=0),
        "sm_clock": 1980,
        "clocks_event_reasons": 0x1,  # GpuIdle
        "ecc_volatile": 0,
        "ecc_aggregate": 0,
        "retired_sbe": nvml_error(NOT_SUPPORTED),  # Hopper remaps rows instead
        "retired_dbe": nvml_error(NOT_SUPPORTED),
        "retired_pending": nvml_error(NOT_SUPPORTED),
        "remapped_rows": (0, 0, 0, 0),
        "pcie_replay": 0,
        "register_events": None,
    }
    base.update(overrides)
    return base


class FakeNvml:
    """State behind the fake functions; ``install`` patches pynvml."""

    def __init__(self, gpus: list[dict[str, Any]], *, init_error: int | None = None,
                 count_error: int | None = None, driver: str = "550.90.07",
                 driver_lacks: tuple[str, ...] = ()) -> None:
        """``driver_lacks``: NVML functions this driver's libnvidia-ml.so does not
        export; nvidia-ml-py answers a call to one with NVMLError_FunctionNotFound."""
        self.gpus = gpus
        self.driver_lacks = driver_lacks
        self.init_error = init_error
        self.count_error = count_error
        self.driver = driver
        self.initialised = 0
        self.events: queue.Queue[Any] = queue.Queue()
        self.event_sets_freed = 0

    def _value(self, handle: int, metric: str) -> Any:
        value = self.gpus[handle][metric]
        if isinstance(value, BaseException):
            raise value
        return value

    def _need_init(self) -> None:
        if self.initialised <= 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    def install(self, mp: pytest.MonkeyPatch) -> FakeNvml:
        def init() -> None:
            if self.init_error is not None:
                raise nvml_error(self.init_error)
            self.initialised += 1

        def shutdown() -> None:
            self._need_init()
            self.initialised -= 1

        def count() -> int:
            self._need_init()
            if self.count_error is not None:
                raise nvml_error(self.count_error)
            return len(self.gpus)

        def handle(i: int) -> int:
            self._need_init()
            value = self.gpus[i].get("handle")
            if isinstance(value, BaseException):
                raise value
            return i

        def temperature_threshold(h: int, kind: int) -> int:
            if kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
                return self._value(h, "slowdown_temp")
            assert kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
            return self._value(h, "shutdown_temp")

        def ecc(h: int, error_type: int, counter: int) -> int:
            assert error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
            return self._value(h, "ecc_volatile" if counter == pynvml.NVML_VOLATILE_ECC
                               else "ecc_aggregate")

        def retired(h: int, cause: int) -> list[int]:
            key = ("retired_dbe" if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
                   else "retired_sbe")
            return self._value(h, key)

        def register(h: int, types: int, event_set: Any) -> None:
            assert types == pynvml.nvmlEventTypeXidCriticalError
            self._value(h, "register_events")

        def wait(event_set: Any, timeout_ms: int) -> Any:
            try:
                item = self.events.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                raise nvml_error(pynvml.NVML_ERROR_TIMEOUT) from None
            if isinstance(item, BaseException):
                raise item
            gpu_index, xid = item
            return SimpleNamespace(device=gpu_index, eventType=pynvml.nvmlEventTypeXidCriticalError,
                                   eventData=xid, gpuInstanceId=0, computeInstanceId=0)

        def free(event_set: Any) -> None:
            self.event_sets_freed += 1

        fns = {
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlSystemGetDriverVersion": lambda: self.driver,
            "nvmlDeviceGetCount": count,
            "nvmlDeviceGetHandleByIndex": handle,
            "nvmlDeviceGetIndex": lambda h: h,
            "nvmlDeviceGetName": lambda h: self._value(h, "name"),
            "nvmlDeviceGetUUID": lambda h: self._value(h, "uuid"),
            "nvmlDeviceGetTemperature": lambda h, s: self._value(h, "temperature"),
            "nvmlDeviceGetTemperatureThreshold": temperature_threshold,
            "nvmlDeviceGetPowerUsage": lambda h: self._value(h, "power"),
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: self._value(h, "power_limit"),
            "nvmlDeviceGetMemoryInfo": lambda h: self._value(h, "memory"),
            "nvmlDeviceGetUtilizationRates": lambda h: self._value(h, "utilization"),
            "nvmlDeviceGetClockInfo": lambda h, c: self._value(h, "sm_clock"),
            "nvmlDeviceGetCurrentClocksEventReasons": lambda h: self._value(
                h, "clocks_event_reasons"),
            # the same bits under their pre-r535 name
            "nvmlDeviceGetCurrentClocksThrottleReasons": lambda h: self._value(
                h, "clocks_event_reasons"),
            "nvmlDeviceGetTotalEccErrors": ecc,
            "nvmlDeviceGetRetiredPages": retired,
            "nvmlDeviceGetRetiredPagesPendingStatus": lambda h: self._value(h, "retired_pending"),
            "nvmlDeviceGetRemappedRows": lambda h: self._value(h, "remapped_rows"),
            "nvmlDeviceGetPcieReplayCounter": lambda h: self._value(h, "pcie_replay"),
            "nvmlEventSetCreate": lambda: object(),
            "nvmlDeviceRegisterEvents": register,
            "nvmlEventSetWait_v2": wait,
            "nvmlEventSetFree": free,
        }
        def not_exported(*args: Any) -> Any:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

        for name in self.driver_lacks:
            assert name in fns, name
            fns[name] = not_exported
        for name, fn in fns.items():
            assert hasattr(pynvml, name), name  # only patch functions nvidia-ml-py really has
            mp.setattr(pynvml, name, fn)
        return self


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False
