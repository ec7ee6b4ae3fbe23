"""Exponential reconnect back-off with jitter (pure: no clock, no sleeping)."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive reconnect attempts.

    Attempt k (from 0) waits ``base_k = min(maximum, initial * factor**k)``
    scaled by a random factor in ``[1 - jitter, 1]`` so that agents cut off
    together do not reconnect together.  ``reset()`` after a success.

    Raises (constructor):
        ValueError: ``initial`` or ``maximum`` not positive, ``maximum <
            initial``, ``factor < 1`` or ``jitter`` outside [0, 1].
    """

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not initial > 0:
            raise ValueError(f"Backoff initial {initial!r} must be > 0 seconds")
        if not maximum >= initial:
            raise ValueError(f"Backoff maximum {maximum!r} must be >= initial {initial!r}")
        if not factor >= 1:
            raise ValueError(f"Backoff factor {factor!r} must be >= 1")
        if not 0 <= jitter <= 1:
            raise ValueError(f"Backoff jitter {jitter!r} must be in [0, 1]")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def base(self, attempt: int) -> float:
        """The un-jittered delay of ``attempt``."""
        # min() before the power would overflow for large attempts
        if attempt > 1000:
            return self.maximum
        return min(self.maximum, self.initial * self.factor**attempt)

    def next_delay(self) -> float:
        """The delay before the next attempt; advances the attempt counter."""
        base = self.base(self.attempt)
        self.attempt += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again from ``initial`` (after a successful connection)."""
        self.attempt = 0
