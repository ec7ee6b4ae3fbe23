"""Drives Flower 1.42's own SecAgg+ functions; run with the bench-only .venv-flwr python.

Client side: the per-stage functions of ``flwr.client.mod.secure_aggregation.
secaggplus_mod`` (``_setup``, ``_share_keys``, ``_collect_masked_vectors``,
``_unmask``) on a ``SecAggPlusState``, exactly as the mod calls them.  Server
side: Flower's ``SecAggPlusWorkflow`` stages need a live Grid, so this script
repeats their glue (neighbour ring, share forwarding, summing masked vectors,
the unmask loop) line for line, calling Flower's own ``combine_shares``,
``pseudo_rand_gen``, ``generate_shared_key``, ``parameters_*``,
``factor_extract`` and ``dequantize``.

Only ``measure_clients`` clients compute real masked vectors (timed); the
server adds random vectors of the same shapes and dtype for the others (the
same additions), and removes the real masks of everyone from real shares.
With ``validate`` every survivor masks for real at the first size and the
unmasked mean is checked against the plain mean.

Input: one JSON object on argv[1]; output: one JSON object on stdout.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
import time
import tracemalloc

import numpy as np
from flwr.app import ConfigRecord
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
CLIP, QRANGE, MOD, MAX_WEIGHT = 8.0, 1 << 22, 1 << 32, 1000.0


def pick_dead(nids, neighbours, fraction, t, rng):
    """A random dead set leaving every survivor's neighbourhood >= t alive."""
    k = round(fraction * len(nids))
    for _ in range(1000):
        dead = set(rng.sample(nids, k))
        if all(len(neighbours[c] - dead) >= t for c in nids if c not in dead):
            return dead
    raise RuntimeError("no dead set keeps every neighbourhood at the threshold")


def main() -> None:
    args = json.loads(sys.argv[1])
    n, num_shares, t = args["n"], args["num_shares"], args["threshold"]
    sizes, server_sizes = args["ds"], set(args["server_ds"])
    fractions, n_measure = args["drop_fractions"], args["measure_clients"]
    rng = np.random.default_rng(args.get("seed", 0))
    prng = random.Random(args.get("seed", 0))
    random.seed(args.get("seed", 0))
    nids = list(range(1, n + 1))
    states = {nid: mod.SecAggPlusState() for nid in nids}
    setup_time = {nid: 0.0 for nid in nids}
    setup_bytes = {nid: 0 for nid in nids}

    def timed(nid, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        setup_time[nid] += time.perf_counter() - t0
        return out

    # neighbour ring, as SecAggPlusWorkflow.setup_stage builds it
    order = nids[:]
    random.shuffle(order)
    half = num_shares >> 1
    neighbours = {
        nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)
    }
    setup_cfg = {
        Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: num_shares, Key.THRESHOLD: t,
        Key.CLIPPING_RANGE: CLIP, Key.TARGET_RANGE: QRANGE, Key.MOD_RANGE: MOD,
        Key.MAX_WEIGHT: MAX_WEIGHT,
    }
    pubkeys = {}
    for nid in nids:
        states[nid].nid = nid
        res = timed(nid, mod._setup, states[nid], ConfigRecord(dict(setup_cfg)))
        pubkeys[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
        setup_bytes[nid] += len(pubkeys[nid][0]) + len(pubkeys[nid][1])
    fwd_ct = {nid: [] for nid in nids}
    fwd_src = {nid: [] for nid in nids}
    for nid in nids:
        cfg = ConfigRecord({str(nb): pubkeys[nb] for nb in neighbours[nid]})
        res = timed(nid, mod._share_keys, states[nid], cfg)
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
            fwd_ct[dst].append(ct)
            fwd_src[dst].append(nid)
            setup_bytes[nid] += len(ct) + 8
    deads = {f: pick_dead(nids, neighbours, f, t, prng) for f in fractions}
    always_alive = [c for c in nids if not any(c in dd for dd in deads.values())]
    measured = always_alive[:n_measure]
    # the share-storing half of _collect_masked_vectors for everyone else (not timed)
    for nid in nids:
        if nid in measured:
            continue
        for src, ct in zip(fwd_src[nid], fwd_ct[nid], strict=True):
            _, _, b_share, sk_share = share_keys_plaintext_separate(
                decrypt(states[nid].ss2_dict[src], ct)
            )
            states[nid].rd_seed_share_dict[src] = b_share
            states[nid].sk1_share_dict[src] = sk_share

    out = {"n": n, "sizes": {}}
    for size_index, d in enumerate(sizes):
        validate = args.get("validate", False) and size_index == 0
        real = set(nids) if validate else set(measured)
        client_time, client_bytes, masked, inputs, peak = {}, {}, {}, {}, 0
        for nid in sorted(real):
            x = rng.uniform(-1, 1, d).astype(np.float32)
            inputs[nid] = x
            params = ndarrays_to_parameters([x])
            cfg = ConfigRecord({Key.CIPHERTEXT_LIST: fwd_ct[nid], Key.SOURCE_LIST: fwd_src[nid]})
            first = nid == measured[0]
            if first:
                tracemalloc.start()
            t0 = time.perf_counter()
            res = mod._collect_masked_vectors(states[nid], cfg, int(MAX_WEIGHT), params)
            client_time[nid] = time.perf_counter() - t0
            if first:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            blobs = res[Key.MASKED_PARAMETERS]
            client_bytes[nid] = sum(len(b) for b in blobs)
            masked[nid] = [bytes_to_ndarray(b) for b in blobs]
            del params, res, blobs
        template = [(a.shape, a.dtype) for a in masked[measured[0]]]
        row = {
            "client_masked_input_s": sum(client_time[c] for c in measured) / len(measured),
            "client_setup_s": sum(setup_time[c] for c in measured) / len(measured),
            "client_bytes": sum(client_bytes[c] + setup_bytes[c] for c in measured)
            / len(measured),
            "client_peak_bytes": peak,
            "server": {},
        }
        if d in server_sizes:
            for f in fractions:
                row["server"][str(f)] = run_server(
                    nids, deads[f], neighbours, states, pubkeys, masked, template, t, rng,
                    inputs if validate and f == 0 else None,
                )
            # the unmask answers of a measured client, timed, once (0 % dropouts)
            nid = measured[0]
            cfg = ConfigRecord({
                Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid]), Key.DEAD_NODE_ID_LIST: [],
            })
            t0 = time.perf_counter()
            res = mod._unmask(states[nid], cfg)
            row["client_unmask_s"] = time.perf_counter() - t0
            row["client_bytes"] += sum(len(s) + 8 for s in res[Key.SHARE_LIST])
        out["sizes"][str(d)] = row
        del masked
    print(json.dumps(out))


def run_server(nids, dead, neighbours, states, pubkeys, masked, template, t, rng, inputs):
    """Sum the survivors' masked vectors and unmask, as SecAggPlusWorkflow does; timed.

    ``server_s`` is the whole; ``server_vector_s`` the part spent on length-d
    vector work (PRG streams, additions, mod, dequantise), which scales with d.
    """
    active = [c for c in nids if c not in dead]
    active_set = set(active)
    clock = {"all": 0.0, "vector": 0.0}

    def vector(fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        clock["vector"] += time.perf_counter() - t0
        return out

    masked_sum = None
    for nid in active:
        vec = masked.get(nid)
        if vec is None:
            vec = [rng.integers(0, MOD, shape, dtype=dtype) for shape, dtype in template]
        masked_sum = vec if masked_sum is None else vector(parameters_addition, masked_sum, vec)
    masked_sum = vector(parameters_mod, masked_sum, MOD)
    collected = {nid: [] for nid in nids}
    for nid in active:  # clients' unmask answers (client work, not timed here)
        cfg = ConfigRecord({
            Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid] & active_set),
            Key.DEAD_NODE_ID_LIST: list(neighbours[nid] & dead),
        })
        res = mod._unmask(states[nid], cfg)
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)
    sum_phase = clock["vector"]  # the summing above is all vector work
    t0 = time.perf_counter()
    shapes = get_parameters_shape(masked_sum)
    for nid, share_list in collected.items():
        secret = combine_shares(share_list)
        if nid in active_set:
            mask = vector(pseudo_rand_gen, secret, MOD, shapes)
            masked_sum = vector(parameters_subtraction, masked_sum, mask)
        else:
            nbs = set(neighbours[nid])
            nbs.remove(nid)
            for nb in nbs:
                key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(pubkeys[nb][0])
                )
                mask = vector(pseudo_rand_gen, key, MOD, shapes)
                if nid > nb:
                    masked_sum = vector(parameters_addition, masked_sum, mask)
                else:
                    masked_sum = vector(parameters_subtraction, masked_sum, mask)
    recon = vector(parameters_mod, masked_sum, MOD)
    q_total_ratio, recon = factor_extract(recon)
    agg = vector(dequantize, recon, CLIP, QRANGE)
    offset = -(len(active) - 1) * CLIP
    for vec in agg:
        vec += offset
        vec *= QRANGE / q_total_ratio
    clock["all"] = sum_phase + time.perf_counter() - t0
    result = {
        "server_s": clock["all"],
        "server_vector_s": clock["vector"],
        "survivors": len(active),
        "max_abs_error": None,
    }
    if inputs is not None:
        # Flower's workflow returns the weighted mean (all weights equal here)
        truth = sum(inputs[c].astype(np.float64) for c in active) / len(active)
        result["max_abs_error"] = float(np.abs(agg[0] - truth).max())
    return result


if __name__ == "__main__":
    main()
