"""Round configuration, threshold rules and the neighbour graph.

Thresholds follow the published bounds (Bonawitz et al. 2017, Bell et al.
2020), applied to a client's neighbourhood of m clients (itself included;
m = n on the complete graph, m = k + 1 on a k-regular sparse graph):

* curious server:         t > alpha * m
* semi-malicious server:  t > (m + alpha * m) / 2
* dropouts:               t <= (1 - delta) * m, so a round that loses a
                          fraction delta of each neighbourhood still unmasks.

A configuration that breaks one is refused with ``SecAggConfigError`` naming
the bound and the numbers.  The graph is complete for n <= 64; above, it is a
Harary k-regular ring laid out by a permutation drawn from a seed every client
recomputes from the job, round and cohort.  The coordinator chooses those (it can
try job ids until a layout suits it), so the bounds must hold against any
colluders a site's neighbourhood may hold: an appliance refuses a threshold that
its assumed colluders could split (fedge.agent.guard.refuse_threshold,
``max_colluders``).

Above 64 clients the dropout tolerance is per neighbourhood, not per cohort: a
client left with fewer than t live members of its neighbourhood is pruned, which
costs its neighbours one more, so a few dropouts close together on the ring can
end the whole round.  The degree k is therefore sized for the dropout fraction
(Bell et al. 2020 size k from n, the corrupted fraction, the dropout fraction and
a failure exponent): the smallest even k >= 2 * ceil(1.5 * log2 n) such that, with
every client dropping independently with probability max(delta,
``SPARSE_GRAPH_DROPOUT`` = 0.2), the chance that any neighbourhood keeps fewer
than t is at most 2^-``GRAPH_FAILURE_BITS`` = 2^-10 (exact binomial tail, union
bound over the n neighbourhoods); the complete graph where no sparse k does it.
With alpha = 0.1 and delta <= 0.2 that is k = 58 for n = 100, k = 60 for n = 200,
k = 64 for n = 500 (t = 33, 34, 36); delta = 0.3 needs k = 99 (complete) for
n = 100 and k = 208 for n = 500.  The plan's delta = 0 (no dropout assumed) thus
still gets a graph that survives 20 % random dropouts.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .errors import SecAggConfigError
from .keys import check_client_id

COMPLETE_GRAPH_MAX_N = 64
MAX_COHORT = 65535  # share indices are 16-bit
MAX_VECTOR_LENGTH = 1 << 31
# A sparse graph is sized for at least this dropout fraction, whatever delta says:
# delta = 0 (the plan's default) would otherwise mean a graph that loses rounds to
# a handful of dropouts close together on the ring.
SPARSE_GRAPH_DROPOUT = Fraction(1, 5)
# ... and so that any neighbourhood falls below t with probability <= 2^-10 per round
# under independent dropouts at that rate (a lost round is retried: a liveness
# target, not a security one, which the thresholds' deterministic bounds carry).
GRAPH_FAILURE_BITS = 10
# Beyond this the sizing search stops (its exact tail sums grow with k): a cohort
# that needs more neighbours and is too large for the complete graph is refused.
MAX_SPARSE_DEGREE = 1024


def default_degree(n: int) -> int:
    """The fewest neighbours per client: n - 1 (complete) for n <= 64, else
    2*ceil(1.5*log2 n) (Bell et al.'s logarithmic floor; `dropout_degree` sizes the
    graph a round actually uses, never below this)."""
    if n <= COMPLETE_GRAPH_MAX_N:
        return n - 1
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def dropout_degree(n: int, *, alpha: float, delta: float, semi_malicious: bool = True) -> int:
    """Neighbour count per client, sized so a round survives dropouts (module doc).

    n - 1 for n <= 64; else the smallest even k >= default_degree(n) whose
    neighbourhoods of m = k + 1, each needing t (the smallest threshold the security
    bound allows for m) live, all keep t with probability >= 1 - 2^-GRAPH_FAILURE_BITS
    when each client drops independently with probability max(delta,
    SPARSE_GRAPH_DROPOUT); n - 1 when no k < n - 1 does.  Exact integer arithmetic:
    every client derives the same k on any platform.

    Raises:
        SecAggConfigError: alpha or delta out of range, or n - 1 > MAX_SPARSE_DEGREE
            and no k up to it suffices.
    """
    return _dropout_degree(n, _exact(alpha, "alpha"), _exact(delta, "delta"),
                           bool(semi_malicious))


@functools.lru_cache(maxsize=1024)
def _dropout_degree(n: int, alpha: Fraction, delta: Fraction, semi_malicious: bool) -> int:
    if n <= COMPLETE_GRAPH_MAX_N:
        return n - 1
    q = max(delta, SPARSE_GRAPH_DROPOUT)
    k = default_degree(n)
    while k < n - 1:
        if k > MAX_SPARSE_DEGREE:
            raise SecAggConfigError(
                f"no neighbour graph of up to {MAX_SPARSE_DEGREE} neighbours keeps every "
                f"neighbourhood at its threshold through {float(q):.0%} dropouts for n={n}, "
                f"alpha={float(alpha)}: lower the plan's [secagg] delta or alpha, or the cohort")
        t, _ = _lower_bound(n, k, alpha, semi_malicious)
        if _all_keep_threshold(n, k + 1, max(t, 1), q):
            return k
        k += 2
    return n - 1


def _all_keep_threshold(n: int, m: int, t: int, q: Fraction) -> bool:
    """n * P[Binomial(m, 1 - q) < t] <= 2^-GRAPH_FAILURE_BITS, in integers."""
    a, b = q.numerator, q.denominator  # drop: a/b, stay: (b - a)/b
    stay = b - a
    short = sum(math.comb(m, j) * stay**j * a ** (m - j) for j in range(t))
    return (n * short) << GRAPH_FAILURE_BITS <= b**m


def _exact(value: float, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SecAggConfigError(f"{name} must be a number, got {value!r}")
    if not 0 <= value < 1 or math.isnan(value):
        raise SecAggConfigError(f"{name}={value} must lie in [0, 1)")
    return Fraction(repr(float(value)))


def _smallest_above(x: Fraction) -> int:
    return math.floor(x) + 1


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters every party of a round must agree on.

    ``n`` is the cohort size, ``threshold`` the number of shares that recover a
    secret within a neighbourhood, ``clip`` the quantisation range [-clip, clip],
    ``vector_length`` the length d of every client's input, ``min_clients`` the
    fewest surviving inputs for which a sum is released, ``degree`` the number
    of neighbours of each client (n - 1: complete graph), ``stage_timeout`` the
    seconds the server waits at each stage.

    Raises (on construction):
        SecAggConfigError: any value out of range or a threshold outside the bounds.
    """

    n: int
    threshold: int
    clip: float
    vector_length: int
    alpha: float = 0.0
    delta: float = 0.0
    semi_malicious: bool = True
    min_clients: int | None = None
    degree: int | None = None
    stage_timeout: float = 30.0

    def __post_init__(self) -> None:
        n = self.n
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_COHORT:
            raise SecAggConfigError(f"cohort size n={n!r} must be an integer in 2..{MAX_COHORT}")
        if self.degree is None:
            object.__setattr__(self, "degree", dropout_degree(
                n, alpha=self.alpha, delta=self.delta, semi_malicious=self.semi_malicious))
        k = self.degree
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
            raise SecAggConfigError(f"degree k={k!r} must be an integer in 1..n-1={n - 1}")
        if k < n - 1 and (k % 2 or k < 2):
            raise SecAggConfigError(
                f"degree k={k} of a sparse graph must be even and >= 2 (Harary ring), "
                f"or n-1={n - 1}"
            )
        if not isinstance(self.clip, int | float) or not math.isfinite(self.clip) or self.clip <= 0:
            raise SecAggConfigError(f"clip={self.clip!r} must be a finite number > 0")
        d = self.vector_length
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_VECTOR_LENGTH:
            raise SecAggConfigError(f"vector_length={d!r} must be an integer in 1..2^31")
        st = self.stage_timeout
        if not isinstance(st, int | float) or not math.isfinite(st) or st <= 0:
            raise SecAggConfigError(f"stage_timeout={st!r} must be a finite number of seconds > 0")
        check_threshold(
            self.threshold,
            n=n,
            degree=k,
            alpha=self.alpha,
            delta=self.delta,
            semi_malicious=self.semi_malicious,
        )
        if self.min_clients is None:
            object.__setattr__(self, "min_clients", self.threshold)
        mc = self.min_clients
        if isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= n:
            raise SecAggConfigError(f"min_clients={mc!r} must be an integer in 1..n={n}")

    @classmethod
    def derive(
        cls,
        n: int,
        *,
        alpha: float,
        delta: float,
        semi_malicious: bool = True,
        clip: float,
        vector_length: int,
        min_clients: int | None = None,
        degree: int | None = None,
        stage_timeout: float = 30.0,
    ) -> SecAggConfig:
        """The configuration with the smallest threshold the bounds allow.

        Raises:
            SecAggConfigError: no threshold satisfies both the security bound and the
                dropout bound, or any other value is out of range.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_COHORT:
            raise SecAggConfigError(f"cohort size n={n!r} must be an integer in 2..{MAX_COHORT}")
        if degree is None:
            degree = dropout_degree(n, alpha=alpha, delta=delta, semi_malicious=semi_malicious)
        k = degree
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
            raise SecAggConfigError(f"degree k={k!r} must be an integer in 1..n-1={n - 1}")
        lower, _ = _lower_bound(n, k, _exact(alpha, "alpha"), semi_malicious)
        return cls(
            n=n,
            threshold=max(lower, 1),
            clip=clip,
            vector_length=vector_length,
            alpha=alpha,
            delta=delta,
            semi_malicious=semi_malicious,
            min_clients=min_clients,
            degree=k,
            stage_timeout=stage_timeout,
        )

    @property
    def complete_graph(self) -> bool:
        return self.degree == self.n - 1

    @property
    def neighbourhood_size(self) -> int:
        """m: the clients whose shares of one secret exist (neighbours and itself)."""
        assert self.degree is not None
        return self.degree + 1

    @property
    def bits(self) -> int:
        """Quantisation bits for this cohort size (no wrap of a sum of n inputs)."""
        from fedge import core

        return core.quant_bits(self.n)


def _where(n: int, k: int) -> str:
    return f"n={n}" if k == n - 1 else f"neighbourhood size m={k + 1} (n={n}, degree k={k})"


def _lower_bound(n: int, k: int, alpha: Fraction, semi_malicious: bool) -> tuple[int, str]:
    m = k + 1
    mm = "n" if k == n - 1 else "m"
    if semi_malicious:
        x = (m + alpha * m) / 2
        rule = f"semi-malicious bound t > ({mm} + alpha*{mm})/2"
    else:
        x = alpha * m
        rule = f"curious-server bound t > alpha*{mm}"
    bound = _smallest_above(x)
    if x.denominator != 1:
        text = rule.split(" t > ")[0] + f" ceil({rule.split(' t > ')[1]}) = {bound}"
    else:
        text = rule + f", i.e. t >= {bound}"
    return bound, text


def check_threshold(
    threshold: int, *, n: int, degree: int, alpha: float, delta: float, semi_malicious: bool
) -> None:
    """Check ``threshold`` against the security and dropout bounds.

    Raises:
        SecAggConfigError: e.g. "threshold 4 is below the semi-malicious bound
            ceil((n + alpha*n)/2) = 6 for n=10, alpha=0.1".
    """
    a = _exact(alpha, "alpha")
    dl = _exact(delta, "delta")
    m = degree + 1
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= m:
        raise SecAggConfigError(
            f"threshold {threshold!r} must be an integer in 1..{m} for {_where(n, degree)}"
        )
    bound, text = _lower_bound(n, degree, a, semi_malicious)
    if threshold < bound:
        raise SecAggConfigError(
            f"threshold {threshold} is below the {text} for {_where(n, degree)}, alpha={alpha}"
        )
    survivors = math.floor((1 - dl) * m)
    if threshold > survivors:
        mm = "n" if degree == n - 1 else "m"
        raise SecAggConfigError(
            f"threshold {threshold} is above the dropout bound floor((1 - delta)*{mm}) = "
            f"{survivors} for {_where(n, degree)}, delta={delta}: a round losing that "
            "fraction of clients could not unmask"
        )


@dataclass(frozen=True)
class RoundContext:
    """What binds a round's keys: the job, the round number, the digest of the global model.

    Raises (on construction):
        SecAggConfigError: empty or overlong job id, negative round, digest not 16-64 bytes.
    """

    job_id: str
    round: int
    model_digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not 1 <= len(self.job_id) <= 256:
            raise SecAggConfigError(f"job_id={self.job_id!r} must be a str of 1-256 characters")
        r = self.round
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 1 << 63:
            raise SecAggConfigError(f"round={r!r} must be a non-negative integer")
        md = self.model_digest
        if not isinstance(md, bytes) or not 16 <= len(md) <= 64:
            raise SecAggConfigError(f"model_digest must be 16-64 bytes, got {md!r:.40}")


# --- neighbour graph -------------------------------------------------------------


def graph_seed(ctx: RoundContext, cohort: Sequence[str]) -> bytes:
    """The seed of the neighbour graph; anyone with the job, round and cohort recomputes it.

    The model digest stays out on purpose: a coordinator that hands out different
    models must not be able to tell from the graph; the masks turn its sum to garbage.
    """
    h = hashlib.sha256(b"fedge/secagg/v1/graph")
    for part in (ctx.job_id.encode(), ctx.round.to_bytes(8, "big")):
        h.update(len(part).to_bytes(4, "big") + part)
    for cid in sorted(cohort):
        raw = cid.encode()
        h.update(len(raw).to_bytes(4, "big") + raw)
    return h.digest()


def check_cohort(cohort: Sequence[str], n: int) -> list[str]:
    """Return the sorted cohort.

    Raises:
        SecAggConfigError: not n distinct valid client ids.
    """
    for cid in cohort:
        check_client_id(cid, what="cohort member")
    if len(set(cohort)) != len(cohort):
        raise SecAggConfigError("cohort lists a client twice")
    if len(cohort) != n:
        raise SecAggConfigError(f"cohort has {len(cohort)} clients, the configuration says n={n}")
    return sorted(cohort)


def neighbours(cohort: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each client's neighbours (itself excluded) on the graph of ``degree`` drawn from ``seed``.

    Complete when degree >= len(cohort) - 1; otherwise a Harary ring: clients
    ordered by SHA-256(seed || id), each joined to the degree/2 nearest on
    either side, so every client has exactly ``degree`` neighbours.
    """
    ids = sorted(cohort)
    n = len(ids)
    if degree >= n - 1:
        everyone = frozenset(ids)
        return {c: everyone - {c} for c in ids}
    ring = sorted(ids, key=lambda c: hashlib.sha256(seed + c.encode()).digest())
    half = degree // 2
    out: dict[str, frozenset[str]] = {}
    for pos, c in enumerate(ring):
        out[c] = frozenset(ring[(pos + off) % n] for off in range(-half, half + 1) if off)
    return out


def neighbours_of(
    client_id: str, cohort: Sequence[str], degree: int, seed: bytes
) -> frozenset[str]:
    """``neighbours(cohort, degree, seed)[client_id]``, computing only that client's set."""
    ids = sorted(cohort)
    n = len(ids)
    if degree >= n - 1:
        return frozenset(ids) - {client_id}
    ring = sorted(ids, key=lambda c: hashlib.sha256(seed + c.encode()).digest())
    pos = ring.index(client_id)
    half = degree // 2
    return frozenset(ring[(pos + off) % n] for off in range(-half, half + 1) if off)


def share_index(cohort_sorted: Sequence[str]) -> dict[str, int]:
    """The Shamir x-coordinate of each client: its 1-based position in the sorted cohort."""
    return {c: i + 1 for i, c in enumerate(cohort_sorted)}
