"""Message types used by the wire tests (registered under the ``test.`` prefix)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from fedge.wire import Tensor, message

U32Vec = Annotated[np.ndarray, Tensor(dtype="uint32", ndim=1)]
F32Mat16 = Annotated[np.ndarray, Tensor(dtype="float32", ndim=2, shape=(None, 16))]


@dataclass(frozen=True)
class Share:
    holder: str
    ciphertext: bytes


@message("test.ping")
@dataclass(frozen=True)
class Ping:
    seq: int


@message("test.everything", max_bytes=64 << 20)
@dataclass(frozen=True)
class Everything:
    count: int
    ratio: float
    name: str
    blob: bytes
    flag: bool
    maybe: int | None
    names: list[str]
    scores: dict[str, float]
    pair: tuple[str, int]
    ids: tuple[int, ...]
    shares: list[Share]
    masked: U32Vec
    rows: F32Mat16
    per_layer: dict[str, Annotated[np.ndarray, Tensor(dtype="float64", ndim=1)]]
    extra: Annotated[np.ndarray, Tensor(dtype="int8", ndim=0)] | None = None
    note: str = "default-note"
    tags: list[str] = field(default_factory=list)


@message("test.model", max_bytes=None)
@dataclass(frozen=True)
class ModelBlob:
    weights: Annotated[np.ndarray, Tensor(dtype="float32", ndim=1)]


@message("test.small", max_bytes=256)
@dataclass(frozen=True)
class Small:
    text: str


@message("test.ruled")
@dataclass(frozen=True)
class Ruled:
    threshold: int

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"threshold {self.threshold} must be >= 1")


def everything(seed: int = 0, d: int = 10) -> Everything:
    rng = np.random.default_rng(seed)
    return Everything(
        count=-5,
        ratio=0.25,
        name="hôpital",
        blob=b"\x00\xffkey",
        flag=True,
        maybe=None,
        names=["a", "b"],
        scores={"c_index": 0.7, "loss": 1.5},
        pair=("x", 3),
        ids=(1, 2, 3),
        shares=[Share("h1", b"ct1"), Share("h2", b"")],
        masked=rng.integers(0, 2**32, size=d, dtype=np.uint32),
        rows=rng.standard_normal((3, 16)).astype(np.float32),
        per_layer={"w": np.arange(4, dtype=np.float64), "b": np.zeros(0, dtype=np.float64)},
        extra=np.array(-7, dtype=np.int8),
    )


def assert_same(a: Everything, b: Everything) -> None:
    for name in Everything.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y)
        elif name == "per_layer":
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        else:
            assert x == y, name
