"""A real `fedge coordinator` process on loopback against one hostile enrolled site (or
operator): each message that used to end the process is refused with a short reason,
and the coordinator goes on serving the others and the round in flight.

The hostile peer is a raw ClientSocket holding an enrolled key: it speaks the
protocol by hand, sending what no agent would.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import numpy as np

from fedge.transport import ClientSocket, HeartbeatConfig
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_hostile_messages import heartbeat as synthetic_heartbeat

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 1
seed = 42
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 3
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = false
clip = 1.0
[deadlines]
cohort_s = 60
train_s = 30
secagg_stage_s = 10
eval_s = 4
"""


def heartbeat(name, **over):
    return synthetic_heartbeat(name, **{"datasets": ["fed_tcga_brca"], **over})


def client(fed, site, events=None):
    return ClientSocket(fed.sites[site]["curve"], fed.coord_keys.public, fed.endpoint,
                        heartbeat=HeartbeatConfig(0.3, 3.0),
                        on_event=events.append if events is not None else None)


async def answers(c, n=8, timeout=3.0):
    """Up to ``n`` decoded messages, heartbeat acks and rosters left out."""
    out = []
    for _ in range(n):
        try:
            frames = await c.recv(timeout=timeout)
        except TimeoutError:
            break
        body = codec.decode([f.bytes for f in frames], max_bytes=1 << 30).body
        if not isinstance(body, m.HeartbeatAck | m.RosterUpdate):
            out.append(body)
    return out


def with_field(body, **raw):
    """``body`` encoded, its body fields replaced by raw wire values that the message
    class itself refuses to hold (a count past 2**40)."""
    frames = [bytes(f) for f in codec.encode(body, sender="rogue")]
    fields = msgpack.unpackb(frames[1])
    fields.update(raw)
    header = msgpack.unpackb(frames[0])
    return header, fields


def test_one_enrolled_site_cannot_end_the_coordinator_with_a_heartbeat_or_a_nested_body(
        federation):
    """F1: a heartbeat naming a site (or version) of 300 000 NULs made a 1.2 MB Rejected
    that process._drain could not encode: exit 1. F3: a 1 KB body nested 1000 deep made
    the decoder raise RecursionError, which handle_frames did not catch: exit 1."""
    fed = federation()
    fed.add_site("rogue", [])
    fed.add_site("honest", [])
    fed.enrol_in_store()
    fed.start_coordinator()

    async def go():
        events = []
        async with client(fed, "honest") as h, client(fed, "rogue", events) as r:
            await h.wait_connected(20)
            await r.wait_connected(20)
            said = {}
            header = bytes(codec.encode(heartbeat("rogue"), sender="rogue")[0])
            for name, frames in [
                ("site", codec.encode(heartbeat("rogue", site="\x00" * 300_000), sender="rogue")),
                ("version", codec.encode(heartbeat("rogue", version="\x00" * 300_000),
                                         sender="rogue")),
                ("nested", [header, b"\x91" * 1000 + b"\xc0"]),
            ]:
                await r.send(frames)
                said[name] = await answers(r, n=3, timeout=2.0)
                assert fed.coordinator.p.poll() is None, (name, fed.dump())
                if name == "version":  # refused for its version: told, dropped, back again
                    for _ in range(100):
                        if any(e.kind == "disconnected" for e in events):
                            break
                        await asyncio.sleep(0.1)
                    dropped = any(e.kind == "disconnected" for e in events)
                    await r.wait_connected(20)
            await h.send(codec.encode(heartbeat("honest"), sender="honest"))
            for _ in range(3):
                frames = await h.recv(timeout=5)
                if isinstance(codec.decode([f.bytes for f in frames], max_bytes=1 << 30).body,
                              m.HeartbeatAck):
                    return said, True, dropped
            return said, False, dropped

    said, honest_answered, dropped = asyncio.run(go())
    assert honest_answered and fed.coordinator.p.poll() is None, fed.dump()
    for name in ("site", "nested"):
        rejected = [b for b in said[name] if isinstance(b, m.Rejected)]
        assert rejected and all(len(b.reason) < 400 for b in rejected), (name, said[name])
    assert "heartbeat names site '\\x00" in said["site"][0].reason
    assert said["nested"][0].reason.startswith("BadField: body: [[[...]]]")
    # refused for its version, the site is told why, then dropped
    assert dropped
    [told] = [b for b in said["version"] if isinstance(b, m.Rejected)]
    assert "printable string of at most 64" in told.reason and len(told.reason) < 400
    [refused] = fed.audit("version_refused")
    assert "printable string of at most 64" in refused["detail"]
    assert len(refused["detail"]) < 400
    assert "Traceback" not in fed.coordinator.output()


def test_example_counts_past_2_40_are_refused_and_the_round_commits(federation):
    """F2: EvalResult.n_examples = 2**64 - 1 (a valid wire int) overflowed SQLite's
    INTEGER at commit; tick raised, the process ended and the round was never
    committed. A TrainDone count as large set every other site's weight to ~0. The
    decoder now refuses both, naming n_examples, and the round commits."""
    fed = federation()
    fed.add_site("rogue", [])
    fed.enrol_in_store()
    fed.start_coordinator()
    job = fed.submit(PLAN)

    async def go():
        refused = []
        async with client(fed, "rogue") as c:
            await c.wait_connected(20)
            end = time.monotonic() + 120
            beat = 0.0
            while time.monotonic() < end and fed.coordinator.p.poll() is None:
                status = fed.job(job)["status"]
                if status in ("completed", "failed"):
                    break
                if time.monotonic() - beat > 1.0:
                    await c.send(codec.encode(heartbeat("rogue"), sender="rogue"))
                    beat = time.monotonic()
                try:
                    frames = await c.recv(timeout=0.5)
                except TimeoutError:
                    continue
                env = codec.decode([f.bytes for f in frames], max_bytes=1 << 30)
                b, kw = env.body, {"sender": "rogue", "job": env.header.job,
                                   "round": env.header.round}
                if isinstance(b, m.Rejected):
                    refused.append(b.reason)
                elif isinstance(b, m.TrainTask):
                    # first a count past 2**40, then an honest one
                    header, fields = with_field(m.TrainDone(b.task_id, 10, {"loss": 1.0}),
                                                n_examples=2 ** 64 - 1)
                    header.update(job=kw["job"], round=kw["round"])
                    await c.send([msgpack.packb(header), msgpack.packb(fields)])
                    await c.send(codec.encode(m.TrainDone(b.task_id, 10, {"loss": 1.0}), **kw))
                    dim = b.weights.size + 1
                elif isinstance(b, m.AggregateBegin):
                    vec = np.zeros(dim, np.float32)
                    vec[-1] = b.weight_scale * 10
                    await c.send(codec.encode(m.PlainUpdate(b.task_id, vec), **kw))
                elif isinstance(b, m.EvalTask):
                    header, fields = with_field(m.EvalResult(b.task_id, 10, {"loss": 1.0}),
                                                n_examples=2 ** 64 - 1)
                    header.update(job=kw["job"], round=kw["round"])
                    await c.send([msgpack.packb(header), msgpack.packb(fields)])
        return refused

    refused = asyncio.run(go())
    assert fed.coordinator.p.poll() is None, fed.dump()
    row = fed.job(job)
    assert (row["status"], row["committed_round"]) == ("completed", 1), fed.dump()
    count = [r for r in refused if "n_examples 18446744073709551615 is not in" in r]
    assert len(count) == 2 and any("TrainDone" in r for r in count) \
        and any("EvalResult" in r for r in count), refused


def test_an_operator_cannot_end_the_admin_channel_with_a_nested_request_or_a_long_op(
        tmp_path):
    """F3/F4: a viewer's 1 KB request nested 1000 deep raised RecursionError in
    serve_admin (not a WireError), and an unknown op was quoted whole into a reply
    that could not be encoded: either ended the admin channel for every operator,
    silently. Each is now answered with a short error and the channel goes on."""
    import zmq
    from test_console_e2e import ConsoleFederation

    from fedge.console.protocol import AdminRequest

    op = ConsoleFederation(tmp_path)
    try:
        v = op.viewer
        for _ in range(60):
            try:
                v.call("whoami")
                break
            except TimeoutError:
                time.sleep(0.5)
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_serverkey = v.server_public_key.encode()
        s.curve_publickey = v.public_key.encode()
        s.curve_secretkey = v.secret_key.encode()
        s.connect(v.endpoint)
        try:
            header = bytes(codec.encode(AdminRequest("whoami", "{}", {}), sender="console")[0])
            errors = []
            for frames in ([header, b"\x91" * 1000 + b"\xc0"],
                           codec.encode(AdminRequest("\x00" * (1 << 20), "{}", {}),
                                        sender="console")):
                s.send_multipart(frames)
                assert s.poll(20_000), op.log("coordinator")[-3000:]
                reply = codec.decode(s.recv_multipart(), max_bytes=1 << 30).body
                assert not reply.ok and len(reply.error) < 400
                errors.append(reply.error)
        finally:
            s.close(0)
        assert errors[0].startswith("malformed request: body: [[[...]]]")
        assert errors[1].startswith("unknown op '\\x00")
        assert v.call("whoami")[0]["role"] == "viewer"
        assert op.procs[0].poll() is None
    finally:
        op.close()
