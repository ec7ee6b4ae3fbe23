"""End-to-end federations: real `fedge coordinator` and `fedge agent` processes."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from fedge.coordinator import checkpoint as ck

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = {rounds}
min_clients = {min_clients}
seed = 42
[model]
name = "cox_linear"
params = {{ in_features = 39 }}
[train]
steps = 3
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedadam"
server_learning_rate = 0.05
beta1 = 0.9
beta2 = 0.99
tau = 0.001
[secagg]
enabled = true
alpha = 0.1
delta = 0.0
clip = 1.0
[deadlines]
cohort_s = 60
train_s = {train_s}
secagg_stage_s = {stage_s}
eval_s = 10
"""


def plan(rounds=3, min_clients=3, train_s=60, stage_s=10):
    return PLAN.format(rounds=rounds, min_clients=min_clients, train_s=train_s, stage_s=stage_s)


def in_process_reference(plan_text, sites):
    """The same job without secure aggregation or processes: local_train per site,
    clipped weighted mean, strategy step (SCAFFOLD: with c, c_i and the Δc half)."""

    from fedge.agent.trainer import TorchTrainer
    from fedge.coordinator.plan import parse_plan
    from fedge.coordinator.rounds import train_seed, weight_scale
    from fedge.coordinator.service import torch_initial_weights
    from fedge.coordinator.strategies import Strategy, mean_update

    p = parse_plan(plan_text)
    w = torch_initial_weights(p)  # the job's starting model, as the coordinator builds it
    strategy = Strategy(p.strategy)
    trainers = {s: TorchTrainer([ds]) for s, ds in sites.items()}
    d = w.size
    ci: dict[str, np.ndarray | None] = {s: None for s in sites}
    for r in range(1, p.rounds + 1):
        kw = {s: {"server_control": strategy.server_control(d), "client_control": ci[s]}
              if p.scaffold else {} for s in sites}
        outs = {s: t.train(s, "ref", p, w, round=r, seed=train_seed(p.seed, r, s), **kw[s])
                for s, t in sorted(trainers.items())}
        scale = weight_scale(p.secagg.clip, max(o.n_examples for o in outs.values()))
        total = np.zeros(2 * d + 1 if p.scaffold else d + 1)
        for s, o in outs.items():
            wi = scale * o.n_examples
            parts = [o.weights.astype(np.float64) - w]
            if p.scaffold:
                parts.append(o.delta_control.astype(np.float64))
                ci[s] = ((np.zeros(d, np.float32) if ci[s] is None else ci[s])  # what was summed
                         + np.clip(o.delta_control, -p.secagg.clip, p.secagg.clip))
            total[:-1] += wi * np.clip(np.concatenate(parts), -p.secagg.clip, p.secagg.clip)
            total[-1] += wi
        if p.scaffold:
            w = strategy.step(w, mean_update(total[:d], total[-1]),
                              mean_control=mean_update(total[d:2 * d], total[-1]))
        else:
            w = strategy.step(w, mean_update(total[:-1], total[-1]))
    return w, strategy.state



def _coordinated(federation, brca, n: int):  # type: ignore[no-untyped-def]
    """A federation of n enrolled sites (site-i holds centre i's rows) with its
    coordinator running; the test starts the agents. Returns (fed, {site: dataset})."""
    fed = federation()
    sites = {f"site-{i}": brca(i) for i in range(n)}
    for s, ds in sites.items():
        fed.add_site(s, [ds])
    fed.enrol_in_store()
    fed.start_coordinator()
    return fed, sites

def test_three_agents_three_rounds_with_secure_aggregation(federation, brca):
    fed, sites = _coordinated(federation, brca, 3)
    # site-0 runs as under systemd: a real notify socket collects its sd_notify datagrams
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(fed.root / "notify.sock"))
    notify.settimeout(0.2)
    states: list[str] = []
    done = threading.Event()

    def drain():  # as systemd does: read every datagram at once (a full queue blocks)
        while not done.is_set():
            try:
                states.append(notify.recv(4096).decode())
            except TimeoutError:
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    for s in sites:
        if s == "site-0":
            fed.env["NOTIFY_SOCKET"] = str(fed.root / "notify.sock")
        fed.start_agent(s)
        fed.env.pop("NOTIFY_SOCKET", None)
    text = plan()
    job = fed.submit(text)
    row = fed.wait_job(job, 180)
    assert row["status"] == "completed", fed.dump()
    rounds = fed.query("SELECT round, status, survivors_json FROM rounds WHERE job_id = ? "
                       "ORDER BY round", job)
    assert [(r["round"], r["status"]) for r in rounds] == [
        (1, "committed"), (2, "committed"), (3, "committed")]
    final = ck.load_checkpoint(ck.final_path(fed.coord_dir, job))
    assert final.model_digest == row["final_digest"]
    expect, _ = in_process_reference(text, sites)
    # SecAgg+ quantises each coordinate of the weighted update to a step of
    # 2c/(2^b - 1), b = quant_bits(3) = 30; three inputs, three rounds, and
    # FedAdam's step bounded by server_learning_rate per coordinate: the
    # difference stays far below 1e-5.
    np.testing.assert_allclose(final.weights, expect, atol=1e-5)
    assert not np.allclose(final.weights, ck.load_checkpoint(
        ck.round_path(fed.coord_dir, job, 0)).weights)
    metrics = fed.query("SELECT * FROM metrics WHERE job_id = ? AND site = '*' AND "
                        "name = 'c_index'", job)
    assert len(metrics) == 3 and all(0 <= m["value"] <= 1 for m in metrics)
    # the coordinator exports the final model to ONNX by itself (a child process)
    deadline = time.monotonic() + 150
    exported: list[dict] = []
    while time.monotonic() < deadline and not exported:
        exported = fed.query("SELECT action, detail FROM audit WHERE action LIKE "
                             "'model_export%'")
        time.sleep(0.5)
    assert [e["action"] for e in exported] == ["model_exported"], (exported, fed.dump())
    import onnxruntime as ort

    onnx_file = ck.final_path(fed.coord_dir, job).with_name("model.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert props["job_id"] == job and props["model_digest"] == final.model_digest
    # the ONNX graph computes the final weights' linear risk score
    x = np.random.default_rng(0).standard_normal((5, 39)).astype(np.float32)
    (risk,) = session.run(None, {session.get_inputs()[0].name: x})
    w, b = final.weights[:39], final.weights[39]
    np.testing.assert_allclose(risk.reshape(-1), x @ w + b, rtol=1e-4, atol=1e-4)
    # agents stop cleanly on SIGTERM
    codes = {name: p.stop() for name, p in fed.procs.items()}
    assert set(codes.values()) == {0}, (codes, fed.dump())
    time.sleep(0.5)
    done.set()
    reader.join(5)
    notify.close()
    text_all = "\n".join(states)
    assert "READY=1" in text_all and "WATCHDOG=1" in text_all and "STOPPING=1" in text_all
    assert any(line.startswith("STATUS=train") for st in states for line in st.splitlines())
    assert text_all.index("READY=1") < text_all.index("STOPPING=1")


SCAFFOLD = """
[strategy]
name = "scaffold"
server_learning_rate = 1.0
"""


def test_scaffold_job_with_secure_aggregation_matches_the_in_process_reference(federation, brca):
    """Two SCAFFOLD rounds through real processes and SecAgg+: c travels with the
    task, each agent's masked input carries [Δy, Δc], the coordinator splits the sum."""
    fed, sites = _coordinated(federation, brca, 3)
    for s in sites:
        fed.start_agent(s)
    default = plan(rounds=2)
    text = default[:default.index("[strategy]")] + SCAFFOLD.lstrip() + \
        default[default.index("[secagg]"):]
    job = fed.submit(text)
    row = fed.wait_job(job, 180)
    assert row["status"] == "completed", fed.dump()
    final = ck.load_checkpoint(ck.final_path(fed.coord_dir, job))
    expect, state = in_process_reference(text, sites)
    np.testing.assert_allclose(final.weights, expect, atol=1e-5)
    last = ck.load_checkpoint(ck.round_path(fed.coord_dir, job, 2))  # c: the last round's
    np.testing.assert_allclose(last.strategy_state["c"], state["c"], atol=1e-5)
    assert np.abs(state["c"]).max() > 1e-3  # the control variate moved
    codes = {name: p.stop() for name, p in fed.procs.items()}
    assert set(codes.values()) == {0}, (codes, fed.dump())


def test_agent_sigkilled_between_scaffold_rounds_resumes_its_state_from_disk(
        federation, brca):
    """site-1 dies as round 2's task arrives; round 2 fails (min_clients = 3) and is
    retried once it restarts. Its c_i and its place in the epoch stream come back
    from its state directory, so the job ends on the uninterrupted reference's model
    (a restart from c_i = 0 and a fresh epoch would not)."""
    fed, sites = _coordinated(federation, brca, 3)
    for s in sites:
        if s == "site-1":
            fed.env["FEDGE_TEST_KILL_ON"] = "train_task@2"
        fed.start_agent(s)
        fed.env.pop("FEDGE_TEST_KILL_ON", None)
    wait_for_connected(fed, set(sites))
    default = plan(rounds=3, train_s=8)
    text = default[:default.index("[strategy]")] + SCAFFOLD.lstrip() + \
        default[default.index("[secagg]"):]
    job = fed.submit(text)
    assert fed.procs["site-1"].p.wait(120) == -9, fed.dump()
    fed.start_agent("site-1")
    row = fed.wait_job(job, 180)
    assert row["status"] == "completed", fed.dump()
    rs = rounds_of(fed, job)
    second = [r["status"] for r in rs if r["round"] == 2]
    assert second[0] == "failed" and second[-1] == "committed", second
    final = ck.load_checkpoint(ck.final_path(fed.coord_dir, job))
    expect, state = in_process_reference(text, sites)
    np.testing.assert_allclose(final.weights, expect, atol=1e-5)
    last = ck.load_checkpoint(ck.round_path(fed.coord_dir, job, 3))  # c: the last round's
    np.testing.assert_allclose(last.strategy_state["c"], state["c"], atol=1e-5)
    codes = {name: p.stop() for name, p in fed.procs.items()}
    assert set(codes.values()) == {0}, (codes, fed.dump())
    # (a write the SIGKILL cut short may have left its temporary, ".<job>.controls.npz.X":
    # younger than TEMP_GRACE_S at the restart, it is swept at a later one)
    kept = sorted(p.name.split(".", 1)[1] for p in (fed.root / "agents/site-1/jobs").iterdir()
                  if not p.name.startswith("."))
    # the plan the site trained under (its digest: an EvalTask must carry that plan),
    # and the standardisation constants it trained with (what an install prepends)
    assert kept == ["controls.npz", "cursors.npz", "plan.npz", "standardisation.npz"], kept


def rounds_of(fed, job):
    return fed.query("SELECT round, attempt, status, cohort_json, survivors_json, reason "
                     "FROM rounds WHERE job_id = ? ORDER BY round, attempt", job)


def test_agents_killed_in_training_and_unmasking_round_completes_and_they_rejoin(
        federation, brca):
    import json

    fed, sites = _coordinated(federation, brca, 4)
    kill = {"site-3": "train_task", "site-2": "secagg.unmask_request"}
    for s in sites:
        if s in kill:
            fed.env["FEDGE_TEST_KILL_ON"] = kill[s]
        fed.start_agent(s)
        fed.env.pop("FEDGE_TEST_KILL_ON", None)
    wait_for_connected(fed, set(sites))
    text = plan(rounds=2, min_clients=2, train_s=20, stage_s=4)
    job = fed.submit(text)
    row = fed.wait_job(job, 150)
    assert row["status"] == "completed", fed.dump()
    rs = rounds_of(fed, job)
    assert [(r["round"], r["status"]) for r in rs] == [(1, "committed"), (2, "committed")]
    # round 1: site-3 died training (not in the sum), site-2 died while unmasking
    # (its masked input was in; the others' shares removed its self mask)
    assert json.loads(rs[0]["cohort_json"]) == sorted(sites)
    assert json.loads(rs[0]["survivors_json"]) == ["site-0", "site-1", "site-2"]
    # round 2 goes on with the living
    assert json.loads(rs[1]["survivors_json"]) == ["site-0", "site-1"]
    assert fed.procs["site-3"].p.wait(5) == -9 and fed.procs["site-2"].p.wait(5) == -9
    # the killed agents restart and are picked again
    fed.start_agent("site-2")
    fed.start_agent("site-3")
    wait_for_task_free(fed, {"site-2", "site-3"})
    # no seed named: the coordinator writes a fresh one in (with_seed). Job 1's seed
    # would give site-0 and site-1 the same round-1 updates as job 1, and a sum over
    # other survivors (the difference: site-2's and site-3's updates) is what their
    # agents refuse (fedge.agent.guard.RevealLog)
    job2 = fed.submit(text.replace("rounds = 2", "rounds = 1").replace(
        "min_clients = 2", "min_clients = 4").replace("seed = 42\n", ""))
    assert fed.wait_job(job2, 120)["status"] == "completed", fed.dump()
    assert json.loads(rounds_of(fed, job2)[0]["survivors_json"]) == sorted(sites)


def test_agent_stopped_mid_training_exits_within_the_grace_not_after_its_task(
        federation, brca):
    """`systemctl stop` (SIGTERM) while a long local training step runs: the agent
    leaves after STOP_GRACE_S, well inside the unit's TimeoutStopSec, instead of
    Python joining the training thread until systemd's SIGKILL."""
    import signal

    from fedge.agent.process import STOP_GRACE_S

    fed, sites = _coordinated(federation, brca, 2)
    for s in sites:
        fed.start_agent(s)
    wait_for_connected(fed, set(sites))
    text = plan(rounds=1, min_clients=2, train_s=600).replace("steps = 3", "steps = 2000000")
    fed.submit(text)
    fed.wait_for(lambda: fed.query("SELECT 1 FROM appliances WHERE site_id = 'site-0' AND "
                                   "current_task LIKE 'train%'"), 120, "site-0 to train")
    agent = fed.procs["site-0"]
    started = time.monotonic()
    agent.p.send_signal(signal.SIGTERM)
    code = agent.p.wait(STOP_GRACE_S + 20)
    took = time.monotonic() - started
    assert code == 0 and took < STOP_GRACE_S + 15, (code, took, agent.output()[-2000:])
    assert "stopping without the task still running" in agent.output()


def test_dropouts_below_threshold_abort_cleanly_and_the_round_is_retried(federation, brca):
    import json

    fed, sites = _coordinated(federation, brca, 3)
    for s in sites:
        if s != "site-0":
            fed.env["FEDGE_TEST_KILL_ON"] = "secagg.unmask_request"
        fed.start_agent(s)
        fed.env.pop("FEDGE_TEST_KILL_ON", None)
    wait_for_connected(fed, set(sites))
    text = plan(rounds=1, min_clients=2, train_s=20, stage_s=3)
    job = fed.submit(text)
    # two of three die while unmasking: 1 survivor < threshold 2, the round aborts
    fed.wait_for(lambda: rounds_of(fed, job), 120, "the first attempt to end")
    first = rounds_of(fed, job)[0]
    assert first["status"] == "failed", fed.dump()
    assert "aggregation failed" in first["reason"]
    assert not ck.round_path(fed.coord_dir, job, 1).exists()
    assert fed.job(job)["committed_round"] == 0
    # the killed agents come back; the retried round completes
    fed.start_agent("site-1")
    fed.start_agent("site-2")
    row = fed.wait_job(job, 150)
    assert row["status"] == "completed", fed.dump()
    rs = rounds_of(fed, job)
    assert rs[-1]["status"] == "committed" and rs[-1]["attempt"] >= 2
    # the round starts as soon as min_clients sites are connected: at least one of
    # the restarted agents has rejoined and contributed
    survivors = json.loads(rs[-1]["survivors_json"])
    assert len(survivors) >= 2 and {"site-1", "site-2"} & set(survivors)


def test_coordinator_sigkilled_mid_round_resumes_to_the_same_final_model(federation, brca):
    fed, sites = _coordinated(federation, brca, 3)
    for s in sites:
        fed.start_agent(s)
    text = plan(rounds=3, min_clients=3)
    uninterrupted = fed.submit(text)
    assert fed.wait_job(uninterrupted, 150)["status"] == "completed", fed.dump()
    # restart the coordinator with a fault: it SIGKILLs itself in round 2's aggregation
    fed.coordinator.kill()
    fed.env["FEDGE_TEST_KILL_AT"] = "2:aggregating"
    fed.start_coordinator()
    fed.env.pop("FEDGE_TEST_KILL_AT")
    interrupted = fed.submit(text)
    assert fed.coordinator.p.wait(240) == -9, fed.dump()
    assert fed.job(interrupted)["committed_round"] == 1
    assert fed.job(interrupted)["status"] == "running"
    fed.start_coordinator()
    row = fed.wait_job(interrupted, 150)
    assert row["status"] == "completed", fed.dump()
    a = ck.load_checkpoint(ck.final_path(fed.coord_dir, uninterrupted)).weights
    b = ck.load_checkpoint(ck.final_path(fed.coord_dir, interrupted)).weights
    assert a.tobytes() == b.tobytes()
    assert fed.audit("job_resumed")


def test_unknown_appliance_is_refused_and_agent_refuses_impostor(federation, brca):
    from fedge.transport import CurveKeyPair

    fed = federation()
    fed.add_site("site-0", [brca(0)])
    fed.add_site("stranger", [brca(1)], enrol=False)
    fed.enrol_in_store()
    fed.start_coordinator()
    stranger = fed.start_agent("stranger", extra=["--connect-timeout", "8"])
    impostor_key = CurveKeyPair.generate().public
    fooled = fed.start_agent("site-0", extra=["--connect-timeout", "8"],
                             coordinator_key=impostor_key)
    assert stranger.p.wait(60) == 3, stranger.output()
    assert "refused our CURVE key" in stranger.output()
    refusals = fed.wait_for(lambda: fed.audit("connection_refused"), 10,
                            "a refusal in the audit log")
    assert any(fed.sites["stranger"]["curve"].public in r["detail"] for r in refusals)
    # site-0 pinned a key the server does not hold: it will not talk to it
    assert fooled.p.wait(60) == 3, fooled.output()
    assert "impostor" in fooled.output()
    assert fed.connected() == set()


def test_malformed_oversized_and_replayed_messages_are_rejected_and_round_goes_on(
        federation, brca):
    import asyncio

    from fedge import __version__
    from fedge.transport import ClientSocket, HeartbeatConfig
    from fedge.wire import codec
    from fedge.wire import messages as m

    fed = federation()
    for i in range(2):
        fed.add_site(f"site-{i}", [brca(i)])
    fed.add_site("rogue", [brca(2)])
    fed.enrol_in_store()
    fed.start_coordinator()
    for s in ("site-0", "site-1"):
        fed.start_agent(s)
    wait_for_connected(fed, {"site-0", "site-1"})
    job = fed.submit(plan(rounds=2, min_clients=2))

    async def rogue():
        keys = fed.sites["rogue"]["curve"]
        async with ClientSocket(keys, fed.coord_keys.public, fed.endpoint,
                                heartbeat=HeartbeatConfig(0.3, 3.0)) as c:
            await c.wait_connected(20)
            hb = m.Heartbeat(site="rogue", version=__version__, health_json="{}",
                             eligible=False, reason="rogue", datasets=[], current_task="")
            frames = [bytes(f) for f in codec.encode(hb, sender="rogue")]
            await c.send(frames)
            await c.send(frames)  # replayed: same message id
            await c.send([b"\xc1not msgpack", b"\x80"])  # malformed header
            hb2 = m.Heartbeat(site="rogue", version=__version__, health_json="{}",
                              eligible=False, reason="", datasets=[], current_task="")
            # oversized for its type: 2 MiB riding along a heartbeat (1 MiB limit)
            await c.send([*codec.encode(hb2, sender="rogue"), b"x" * (2 << 20)])
            spoof = m.Heartbeat(site="site-0", version=__version__, health_json="{}",
                                eligible=True, reason="", datasets=[], current_task="")
            await c.send(codec.encode(spoof, sender="site-0"))  # another site's name
            await c.send(codec.encode(m.TrainDone("t", 5), sender="rogue", job=job,
                                      round=99))  # a round that is not in progress
            replies = []
            for _ in range(8):
                try:
                    frames = await c.recv(timeout=3)
                except TimeoutError:
                    break
                replies.append(codec.decode([f.bytes for f in frames], max_bytes=1 << 20).body)
            return replies

    replies = asyncio.run(rogue())
    rejected = [r.reason for r in replies if isinstance(r, m.Rejected)]
    assert len(rejected) >= 5, replies
    actions = {a["action"] for a in fed.audit() if a["actor"] == "rogue"}
    assert {"replayed_message", "malformed_message", "spoofed_sender",
            "stale_message"} <= actions
    assert any("OversizeMessage" in a["detail"] for a in fed.audit("malformed_message"))
    row = fed.wait_job(job, 150)
    assert row["status"] == "completed", fed.dump()


def wait_for_connected(fed, sites, timeout=120):
    return fed.wait_for(lambda: sites <= fed.connected(), timeout, f"{sites} to connect")


def wait_for_task_free(fed, sites, timeout=120):
    def fresh():
        rows = fed.query("SELECT site_id, last_seen FROM appliances")
        import time
        # the database holds heartbeats at most HEARTBEAT_FLUSH_S (5 s) late
        return all(r["last_seen"] and time.time() - r["last_seen"] < 7
                   for r in rows if r["site_id"] in sites)
    return fed.wait_for(fresh, timeout, f"{sites} to heartbeat again")
