"""The agent's side of signed updates: a TUF client over the agent's existing
ZeroMQ connection, verification with python-tuf, and installation.

`ZmqFetcher` is python-tuf's FetcherInterface: each "URL" (``fedge:<path>``)
becomes chunked `UpdateFetchRequest`s sent through `roundtrip`, a callable the
agent supplies that sends one request over its connection and returns the
reply. python-tuf does all verification (signatures, versions, expiry, hashes,
lengths); this module decides what to install and installs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import sys
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import IO, Any, Protocol

from packaging.version import InvalidVersion, Version
from tuf.api.exceptions import DownloadError, DownloadHTTPError, ExpiredMetadataError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from fedge.update import tuf_repo
from fedge.update.ab import (
    SOFTWARE_ROOT_ENV,
    HealthCheckFailed,
    SelfUpdate,
    Service,
    SlotInstaller,
    UnsafeArchive,
    extract_checked,
    running_version,
)
from fedge.update.files import set_aside, write_atomic, write_json
from fedge.update.messages import (
    ERROR_NOT_FOUND,
    MAX_CHUNK,
    TRANSPORT_FAILURE,
    UpdateAvailable,
    UpdateFetchReply,
    UpdateFetchRequest,
    UpdateOutcome,
    transport_failure,
)
from fedge.update.version import SkewDecision, check_version_skew

log = logging.getLogger("fedge.agent.updates")

URL_SCHEME = "fedge:"
METADATA_BASE = URL_SCHEME + "metadata/"
TARGETS_BASE = URL_SCHEME + "targets/"

REPORTED = "reported.json"  # outcomes sent to roll-outs, for a coordinator asking again
REPORTED_KEEP = 64
# Every outcome, installed or refused, one JSON line each (`AgentUpdater.audit_log`).
# A coordinator decides how often this appliance refuses something (each ask is one
# refusal at most, each retryable one again when asked again), so the file is
# bounded: past AUDIT_ROTATE_BYTES it becomes audit.jsonl.1 (replacing the one
# before) and a new one starts; the two hold thousands of outcomes (a line is under
# 2 KB: a detail is cut at AUDIT_DETAIL_MAX characters), decades of roll-outs.
AUDIT = "audit.jsonl"
AUDIT_ROTATE_BYTES = 4 * 1024 * 1024
AUDIT_DETAIL_MAX = 1000
# One audit writer at a time in this process: an install thread's line and the event
# loop's (`on_heartbeat_ack`) may come together, and two that both see the file past
# AUDIT_ROTATE_BYTES would both rotate it (the second rename fails, or puts a file of
# a few lines in place of audit.jsonl.1). Module-wide: any updater on the state dir.
_AUDIT_LOCK = threading.Lock()
# The fields of an audit line; a line written before they all were kept lacks some
# (read back as None: `audit_log`)
AUDIT_FIELDS = ("time", "rollout_id", "kind", "name", "version", "path", "sha256", "ok",
                "rolled_back", "detail", "targets_version", "targets_signed_by",
                "root_version")
# A software update staged for its restart: what is known of it then (sha256, who
# signed it) for the audit line its outcome gets after the restart (`on_heartbeat_ack`)
STAGED = "staged.json"
# How an outcome refused for expired metadata begins (`handle_update_available`,
# `AgentUpdater.install`): not kept as final, since a clock put right makes it pass
EXPIRED_DETAIL = f"{ExpiredMetadataError.__name__}: "
# who signs each role: the console offline, the coordinator online (re-signed daily)
_SIGNED_BY = {"root": "the console", "targets": "the console",
              "snapshot": "the coordinator", "timestamp": "the coordinator"}

Roundtrip = Callable[[UpdateFetchRequest], UpdateFetchReply]

# A fetch request (a (path, offset) read of a signed, hashed file: asking again is
# harmless) is sent at most this many times before the download fails; each try waits
# `AgentUpdateClient.reply_timeout_s` for its reply, less when the coordinator asks
# again for the roll-out (it saw this site reconnect: the request may have died with
# the old connection).
FETCH_ATTEMPTS = 4
FETCH_RETRY_PAUSE_S = 1.0  # after a send that failed at once (no link, socket replaced)
# One download (a metadata file or a target) must end within DOWNLOAD_FLOOR_S plus
# its signed length at DOWNLOAD_MIN_RATE: a coordinator that answers each request
# with a byte or two (every reply in time) must not hold the agent's one install
# lock for ever. The rate is half the ~35 KB/s a site's link needs to keep its
# connection at all (docs: "Slow links"); the floor leaves room for a few
# reconnections, each of which can cost FETCH_ATTEMPTS tries of a chunk.
DOWNLOAD_MIN_RATE = 16 * 1024  # bytes per second, on average over the download
DOWNLOAD_FLOOR_S = 300.0
# A software update staged while the agent works for a round (training, secure
# aggregation, evaluation: `fedge.agent.runtime.Agent.held_round`) restarts the agent
# once that round is over, not at once: leaving mid-round throws the local training
# away, or leaves a secure aggregation whose DP run was charged for an update never
# summed. The wait is bounded (agent.toml update_restart_wait_s): one round at the
# plan's default deadlines (train 600 s, secure aggregation 4 x 60 s, evaluation
# 120 s) fits in it with room, and a coordinator that keeps the site in round after
# round (one that predates holding the ask back) cannot keep it on the old version.
RESTART_WAIT_S = 1800.0
# Once the round is over, the agent waits this long, still idle, before leaving: its
# last reply (the EvalResult) is queued on the socket, which a restart would drop.
RESTART_SETTLE_S = 0.5
IDLE_POLL_S = 5.0  # the agent also says when it becomes idle (`agent_idle`)
# While the unit's launcher runs the version before a software update on trial, the
# trial deferred because the slot root could not be written (a full or read-only
# disk: its start could not be counted), the agent looks this often whether it can be
# written again, and then restarts into the trial (`resume_deferred_trial`).
DEFERRED_CHECK_S = 60.0


class FetchTransportError(DownloadError):
    """The coordinator did not answer a fetch request after `FETCH_ATTEMPTS` tries (the
    connection lost, the link down): nothing was fetched wrong and nothing installed.
    An outcome naming it is `retryable`, and the roll-out asks this site again."""


assert FetchTransportError.__name__ == TRANSPORT_FAILURE  # the outcome's detail says it


class ZmqFetcher(FetcherInterface):
    """Fetch ``fedge:<path>`` in chunks through `roundtrip`.

    A chunk is one request and reply through the agent's and the coordinator's event
    loops, a few ms each whatever its size: the default is the largest the coordinator
    sends (MAX_CHUNK, 1 MiB). bench/updates.py --quick, same run: 64 KiB 25.7 MiB/s,
    256 KiB 68.2, 1 MiB 107.7.

    Each download has a deadline (`deadline_s`), checked after every reply: a
    request in flight is bounded by `AgentUpdateClient.roundtrip` itself."""

    def __init__(self, roundtrip: Roundtrip, *, chunk: int = MAX_CHUNK,
                 min_rate: float = DOWNLOAD_MIN_RATE, floor_s: float = DOWNLOAD_FLOOR_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Raises: ValueError if chunk, min_rate or floor_s is not positive."""
        if chunk <= 0:
            raise ValueError(f"chunk {chunk} must be > 0")
        if not (min_rate > 0 and floor_s > 0):
            raise ValueError(f"min_rate {min_rate!r} and floor_s {floor_s!r} must be > 0")
        self._roundtrip = roundtrip
        self._chunk = chunk
        self._min_rate = min_rate
        self._floor_s = floor_s
        self._clock = clock
        self._max_length: int | None = None  # of the download under way (download_file)

    def deadline_s(self, length: int) -> float:
        """How long a download of at most `length` bytes may take, in all."""
        return self._floor_s + length / self._min_rate

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        # python-tuf passes every download's bound here (a target's signed length, a
        # metadata file's configured maximum); `_fetch` sees only the url
        self._max_length = max_length
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            self._max_length = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(URL_SCHEME):
            raise DownloadError(f"url {url!r} is not a {URL_SCHEME} url")
        path = url[len(URL_SCHEME):]
        return self._chunks(path, self._max_length)

    def _chunks(self, path: str, length: int | None) -> Iterator[bytes]:
        """Raises: FetchTransportError past the deadline of a download of `length`
        bytes at most (none when fetched outside `download_file`); DownloadError for a
        bad reply."""
        offset = 0
        start = self._clock()
        deadline = None if length is None else self.deadline_s(length)
        while True:
            if deadline is not None and self._clock() - start > deadline:
                raise FetchTransportError(
                    f"fetch {path}: {offset} of at most {length} bytes after "
                    f"{self._clock() - start:.1f} s, past this download's deadline of "
                    f"{deadline:.1f} s ({self._floor_s:g} s plus its length at "
                    f"{self._min_rate / 1024:g} KiB/s): the coordinator or the link is "
                    "too slow (nothing installed; asked again, this appliance tries again)")
            reply = self._roundtrip(UpdateFetchRequest(path, offset, self._chunk))
            if not isinstance(reply, UpdateFetchReply):
                raise DownloadError(f"fetch {path}: reply is {type(reply).__name__}, "
                                    "expected UpdateFetchReply")
            if reply.error == ERROR_NOT_FOUND:
                raise DownloadHTTPError(f"fetch {path}: not found", 404)
            if reply.error:
                raise DownloadError(f"fetch {path}: coordinator says {reply.error}")
            if reply.path != path or reply.offset != offset:
                raise DownloadError(f"fetch {path}@{offset}: reply is for "
                                    f"{reply.path}@{reply.offset}")
            if len(reply.data) > self._chunk:
                raise DownloadError(f"fetch {path}: reply carries {len(reply.data)} bytes, "
                                    f"more than the {self._chunk} asked for")
            if not reply.data and not reply.eof:
                raise DownloadError(f"fetch {path}@{offset}: empty chunk without eof")
            offset += len(reply.data)
            if reply.data:
                yield reply.data
            if reply.eof:
                return


@dataclass(frozen=True)
class InstallOutcome:
    kind: str
    name: str
    version: str
    ok: bool
    rolled_back: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ModelInstaller(Protocol):
    def install(self, model_name: str, onnx: bytes | Path) -> object: ...


class SiteStandardisation(Protocol):
    """data set (, job) -> (mean, scale, feature names) of this site's standardiser, as
    job ``job`` trained with it: held in memory, or kept in the job's state on disk
    (which an agent restart keeps; fedge.agent.trainer's ``TorchTrainer.standardisation``),
    else the data set's newest version's, logged; None when the site does not hold the
    data set. May raise when the data set cannot be loaded."""

    def __call__(self, dataset: str, *, job: str | None = None
                 ) -> tuple[Any, Any, list[str]] | None: ...


# data set -> the class names this site declares for it, in label order; None when the
# site does not hold it or names no classes (a table's integer labels)
SiteClasses = Callable[[str], "tuple[str, ...] | None"]


class SiteModels:
    """The appliance's model installer: a pushed model that expects this site's own
    standardisation (its features were standardised at each site with constants that
    never left it) gets that standardisation prepended to its graph before it is
    served, so the hospital's applications send raw rows; a classifier of a data set
    whose classes this site names (an image data set's ``classes``) gets them in its
    ``output`` metadata, which ``fedge serve`` shows in the model's metadata. Any
    other model is installed as it comes.

    A model that needs a data set this site does not hold, or whose features differ
    from the site's (other names, or another order), is refused (the install outcome
    says why); the version already serving keeps serving. A model that names no
    features (a federated one) gets the site's names, in the order its prepended
    standardisation takes them (fedge.serve.sitelocal.standardise_onnx).
    """

    def __init__(self, repository: ModelInstaller, standardisation: SiteStandardisation,
                 *, site: str = "", classes: SiteClasses | None = None) -> None:
        self.repository = repository
        self.standardisation = standardisation
        self.classes = classes
        self.site = site

    def install(self, model_name: str, onnx: bytes | Path) -> object:
        import onnx as onnx_lib

        from fedge.serve.sitelocal import needs_site_standardisation, standardise_onnx

        data = onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes()
        try:
            proto = onnx_lib.load_from_string(data)
        except Exception:  # the repository's checker names what is wrong
            return self.repository.install(model_name, data)
        metadata = {p.key: p.value for p in proto.metadata_props}
        data = self._named(model_name, data, metadata)
        dataset = needs_site_standardisation(metadata)
        if dataset is None:
            return self.repository.install(model_name, data)
        # the constants the model's job trained with, held by the trainer or kept in the
        # job's state on disk (a re-export since would scale the served rows otherwise
        # than training did); else, where neither has them, the newest version's
        job = metadata.get("job_id") or None
        found = self.standardisation(dataset, job=job)
        if found is None:
            raise ValueError(
                f"model {model_name!r} expects each site's own standardisation of data set "
                f"{dataset!r}, which this appliance does not hold; not installed"
            )
        mean, scale, names = found
        data = standardise_onnx(data, mean, scale, feature_names=names, provenance={
            "site": self.site, "dataset": dataset,
            "fitted": "on this site's training split of the data set",
        })
        log.info("model %s: this site's standardisation of %r prepended to its graph",
                 model_name, dataset)
        return self.repository.install(model_name, data)

    def _named(self, model_name: str, data: bytes, metadata: dict[str, str]) -> bytes:
        """``data`` with its logits' class names, where this site declares them."""
        from fedge.serve.sitelocal import name_classes, trained_dataset

        dataset = trained_dataset(metadata)
        classes = self.classes(dataset) if self.classes and dataset else None
        if not classes:
            return data
        named = name_classes(data, classes, provenance=(
            f"site {self.site or '(this appliance)'}'s data set {dataset!r}: its declared "
            "classes, in label order"))
        if named is None:
            log.warning("model %s: its output is not one logit per class of data set %r "
                        "(%d classes here); installed without class names",
                        model_name, dataset, len(classes))
            return data
        log.info("model %s: output named with this site's classes of %r", model_name, dataset)
        return named


class AgentUpdater:
    """Verify and install updates for one appliance.

    State under ``<state_dir>``: ``tuf/metadata/root.json`` (trusted root from
    enrolment), ``tuf/targets/`` (verified downloads, each removed once installed),
    ``updates/installed.json``, ``updates/audit.jsonl`` (every outcome, installed or
    refused, with who signed it; rotated to ``audit.jsonl.1``: AUDIT_ROTATE_BYTES) and
    ``updates/staged.json`` (a software update awaiting its restart); installed apps
    under ``apps/<name>/`` (`current` and the version before it).
    """

    def __init__(self, state_dir: Path, fetcher: FetcherInterface | None = None, *,
                 clock: tuf_repo.Clock = tuf_repo.utcnow) -> None:
        """Raises: FileNotFoundError if the appliance was never enrolled (no root)."""
        self.state_dir = Path(state_dir)
        self.metadata_dir = self.state_dir / "tuf" / "metadata"
        self.targets_dir = self.state_dir / "tuf" / "targets"
        if not (self.metadata_dir / "root.json").exists():
            raise FileNotFoundError(f"no trusted TUF root at {self.metadata_dir / 'root.json'}:"
                                    " enrol the appliance first (fedge agent enrol FILE)")
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.fetcher = fetcher  # AgentUpdateClient sets it to fetch over the connection
        self.clock = clock
        self._updater: Updater | None = None
        self._listed: set[str] = set()  # download names of the targets last verified
        # who signed the targets metadata the last refresh verified (`_signed_by`); None
        # when it verified none (refused, undeliverable, or not refreshed yet)
        self.signers: dict[str, object] | None = None

    # -- verification --------------------------------------------------------------------
    def _refreshed(self) -> Updater:
        updater = Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=METADATA_BASE,
            target_dir=str(self.targets_dir),
            target_base_url=TARGETS_BASE,
            fetcher=self.fetcher,
            config=UpdaterConfig(),
            bootstrap=None,  # trust the cached root.json (written at enrolment)
        )
        # python-tuf reads the wall clock once, when it builds its trusted set; we set
        # the reference time from our clock so expiry (freeze attacks) is testable.
        updater._trusted_set.reference_time = self.clock()
        try:
            updater.refresh()
        except ExpiredMetadataError as exc:
            # python-tuf says only "timestamp.json is expired": name the clocks, since
            # a wrong clock here, at the coordinator or at the console reads the same
            raise ExpiredMetadataError(_expired_detail(updater, exc)) from exc
        return updater

    def refresh(self) -> list[tuf_repo.TargetSpec]:
        """Fetch and verify the newest metadata; return every verified target.

        Raises:
            tuf.api.exceptions.RepositoryError: rollback, freeze (expired), mix-and-match,
                bad signature — anything python-tuf refuses. Expired metadata is an
                ExpiredMetadataError whose message names this appliance's clock, the
                role and when it expired (`_expired_detail`).
            tuf.api.exceptions.DownloadError: the coordinator could not deliver.
        """
        if self.fetcher is None:
            raise DownloadError("no fetcher: attach an AgentUpdateClient or pass fetcher=")
        self.signers = None  # until this refresh verifies targets metadata
        try:
            updater = self._refreshed()
        except DownloadHTTPError as exc:
            if exc.status_code != 404:
                raise
            # the relay keeps the two newest snapshot and targets versions: two publishes
            # between our reading the timestamp and fetching what it named removed it.
            # Once more, from the new timestamp (a second miss is an error)
            log.info("update metadata changed during the refresh (%s): refreshing again", exc)
            updater = self._refreshed()
        self._updater = updater
        targets = tuf_repo.load((self.metadata_dir / "targets.json").read_bytes(), "targets")
        self.signers = self._signed_by(targets)
        self._listed = {_download_name(path) for path in targets.signed.targets}
        specs = []
        for tf in targets.signed.targets.values():
            try:
                specs.append(tuf_repo.TargetSpec.from_target_file(tf))
            except ValueError:
                continue  # signed by the console but not a fedge target: ignore it
        return specs

    def _signed_by(self, targets: Any) -> dict[str, object] | None:
        """Who vouches for the targets metadata `targets` that python-tuf just verified:
        its version, the ids of the targets keys (the console's offline key) whose
        signatures on it verify under the trusted root, and that root's version. None
        (logged) if the trusted root cannot be read back."""
        try:
            root = tuf_repo.load((self.metadata_dir / "root.json").read_bytes(), "root")
            result = root.signed.get_verification_result(
                "targets", targets.signed_bytes, targets.signatures)
        except (OSError, ValueError) as exc:
            log.warning("cannot tell which keys signed targets v%d: %s",
                        targets.signed.version, exc)
            return None
        return {"targets_version": targets.signed.version,
                "targets_signed_by": sorted(result.signed),
                "root_version": root.signed.version}

    def pending(self) -> list[tuf_repo.TargetSpec]:
        """The newest verified target per lineage that this appliance would install
        (`refusal` finds nothing against it).

        Raises: as `refresh`.
        """
        specs = self.refresh()
        newest = tuf_repo.newest_per_lineage(specs)
        return [spec for _, spec in sorted(newest.items())
                if self.refusal(spec, specs) is None]

    def refusal(self, spec: tuf_repo.TargetSpec, specs: list[tuf_repo.TargetSpec]
                ) -> tuple[bool, str] | None:
        """Why the verified target `spec` must not be installed, or None if it may.

        Returns (ok, detail): ok is True when `spec` is exactly what this appliance
        already has (nothing to do), False for a refusal.

        What is already here comes first: a version installed (or, for software,
        installed or running) is nothing to do even after newer ones were signed, so
        a roll-out of it does not stop at this site. Otherwise the coordinator that
        names a version is not trusted (the console lists only the newest of each
        lineage, but targets signed by an earlier console list every version ever
        pushed): a target is installed only if it is the newest signed in its
        lineage among `specs` (the verified targets), and newer than what is
        installed, the floor that stops a rollback whatever is listed. Software
        has one lineage whatever its name, and must also be newer than the version
        that runs now (`fedge.update.ab.running_version`).

        Every comparison is PEP 440, as `fedge.update.ab` orders software slots:
        "1.2" and "1.2.0" are the same version, and the running version may be a
        development build ("0.3.0.dev1"). A verified target's version always is one
        (`from_target_file` lets through only dotted integers); what is installed or
        running may not be (`release_version`), and is then refused against.

        Raises:
            packaging.version.InvalidVersion: a target in `spec` or `specs` that
                `from_target_file` did not make, whose version is not PEP 440.
        """
        mine = Version(spec.version)
        installed = self.installed()
        if spec.kind == "software":
            floors = [(f"installed {key}", v) for key, v in sorted(installed.items())
                      if key.startswith("software/")]
            floors.append(("running software", running_version()))
        else:
            have = installed.get(f"{spec.kind}/{spec.name}")
            floors = [] if have is None else [(f"installed {spec.kind}/{spec.name}", have)]
        ordered = []
        for what, have in floors:
            theirs = release_version(have)
            if theirs is None:
                return False, (f"{spec.kind} {spec.version} cannot be ordered against the "
                               f"{what} {have!r}; refusing it")
            if theirs == mine and spec.kind == "software":
                return True, f"software {spec.version} is the {what} already; nothing to do"
            if theirs == mine:
                return True, (f"{spec.kind} {spec.name} {have} already installed; "
                              f"{spec.version} is the same version, nothing to do")
            ordered.append((what, have, theirs))
        top = tuf_repo.newest_per_lineage(specs).get(_lineage(spec))
        if top is not None and Version(top.version) > mine:
            return False, (f"{spec.kind} {spec.name} {spec.version} is not the newest signed "
                           f"version: {top.path!r} is; refusing to install an older one")
        for what, have, theirs in ordered:
            if theirs > mine:
                return False, (f"{spec.kind} {spec.name} {spec.version} is older than the "
                               f"{what} {have}; refusing it")
        return None

    def download(self, spec: tuf_repo.TargetSpec) -> Path:
        """Download one target and verify its length and hash.

        Raises:
            LookupError: the target is not in the verified metadata.
            tuf.api.exceptions.RepositoryError / DownloadError: tampered or undeliverable.
        """
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        info = self._updater.get_targetinfo(spec.path)
        if info is None:
            raise LookupError(f"target {spec.path!r} is not in the signed targets metadata")
        dest = self.targets_dir / _download_name(spec.path)
        cached = self._updater.find_cached_target(info, str(dest))
        return Path(cached or self._updater.download_target(info, str(dest)))

    def discard_downloads(self, spec: tuf_repo.TargetSpec) -> None:
        """Remove the download of `spec` (its install took what it needs: a model's
        bytes, an unpacked app or slot) and any other no longer listed (a replaced
        version, or one left by a release that kept them all). Installs run one at a
        time, so none of these is in use."""
        keep = self._listed - {_download_name(spec.path)}
        try:
            found = list(self.targets_dir.iterdir())
        except OSError as exc:
            log.warning("cannot list %s to remove installed downloads: %s",
                        self.targets_dir, exc)
            return
        for path in found:
            if path.name in keep or not path.is_file():
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the download %s: %s", path, exc)

    # -- installation --------------------------------------------------------------------
    def installed(self) -> dict[str, str]:
        path = self.state_dir / "updates" / "installed.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def install(self, spec: tuf_repo.TargetSpec, *, models: ModelInstaller | None = None,
                service: Service | None = None, health_deadline_s: float = 30.0,
                rollout_id: str = "") -> InstallOutcome:
        """Download, verify and install `spec`; record, audit and log the outcome
        (under `rollout_id`, the roll-out that asked for it, if any).

        Software goes into an A/B slot and is restarted through `service`; a failed
        health check switches back to the previous slot. Never raises for a failed
        install: the outcome says what happened.

        Raises:
            ValueError: a model target without `models`, or software without `service`.
        """
        if spec.kind == "model" and models is None:
            raise ValueError("installing a model target needs a model repository (models=)")
        if spec.kind == "software" and service is None:
            raise ValueError("installing a software target needs a service (service=)")
        rolled_back = False
        try:
            path = self.download(spec)
            if spec.kind == "model":
                assert models is not None
                served = models.install(spec.name, path.read_bytes())
                detail = f"model {spec.name} {spec.version} installed (serving version {served})"
                _prune_models(models, spec.name)
            elif spec.kind == "app":
                detail = self._install_app(spec, path)
            else:
                assert service is not None
                slots = SlotInstaller(self.state_dir / "software")
                try:
                    slots.install_and_switch(spec.version, path, service,
                                             deadline_s=health_deadline_s)
                    detail = f"software {spec.version} healthy in slot {slots.current_version()}"
                except HealthCheckFailed as exc:
                    rolled_back = exc.rolled_back
                    raise
            ok = True
        except Exception as exc:  # an install failure is an outcome, not a crash
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        finally:
            self.discard_downloads(spec)
        outcome = InstallOutcome(spec.kind, spec.name, spec.version, ok, rolled_back, detail)
        self.record(outcome, rollout_id=rollout_id, path=spec.path, sha256=spec.sha256,
                    signers=self.signers)  # never raises: what is installed stays the outcome
        return outcome

    def conclude(self, msg: UpdateAvailable, spec: tuf_repo.TargetSpec | None, ok: bool,
                 detail: str) -> UpdateOutcome:
        """The outcome of roll-out `msg` that ends before `install` (refused by TUF, not
        signed, older than what is here, a bad software bundle; or nothing to do):
        audited and logged, a refusal at WARNING, as `install` does its own. `spec`
        is the target (verified, or only named by `msg.path`), None if not known.
        Never raises: an audit line that cannot be written is logged, and the outcome
        still goes to the coordinator."""
        outcome = UpdateOutcome(msg.rollout_id, msg.path, ok, False, detail)
        what = InstallOutcome(spec.kind if spec else "", spec.name if spec else "",
                              spec.version if spec else "", ok, False, detail)
        self._audit_or_log(what, rollout_id=msg.rollout_id, path=msg.path,
                           sha256=spec.sha256 if spec else "", signers=self.signers)
        return outcome

    # -- outcomes reported to roll-outs ------------------------------------------------
    def reported(self, rollout_id: str) -> UpdateOutcome | None:
        """The outcome this appliance already reported for `rollout_id`, if any: a
        coordinator that asks again (it lost the answer) gets the same one, and
        nothing is installed twice. A refusal for expired metadata or a fetch the
        connection lost is not one (`retryable`): asked again, perhaps after a clock
        was put right or the link came back, the appliance tries again."""
        if not rollout_id:
            return None
        for doc in reversed(self._reported()):
            if doc.get("rollout_id") != rollout_id:
                continue
            outcome = UpdateOutcome(str(doc["rollout_id"]), str(doc.get("path", "")),
                                    bool(doc.get("ok")), bool(doc.get("rolled_back")),
                                    str(doc.get("detail", "")))
            if not retryable(outcome):
                return outcome
        return None

    def note_reported(self, outcome: UpdateOutcome) -> None:
        """Remember `outcome` for `reported` (the newest REPORTED_KEEP roll-outs); a
        `retryable` one (expired metadata, a fetch the connection lost) is not kept."""
        if not outcome.rollout_id or retryable(outcome):
            return
        docs = [d for d in self._reported() if d.get("rollout_id") != outcome.rollout_id]
        docs.append(asdict(outcome))
        write_json(self.state_dir / "updates" / REPORTED, docs[-REPORTED_KEEP:])

    def _reported(self) -> list[dict[str, Any]]:
        path = self.state_dir / "updates" / REPORTED
        try:
            docs = json.loads(path.read_text())
            if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
                raise ValueError("not a list of outcomes")
            return docs
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            aside = set_aside(path, log)
            log.error("%s is unreadable (%s); moved to %s: an outcome asked for again "
                      "will be found by installing", path, exc, aside.name)
            return []

    def record(self, outcome: InstallOutcome, *, rollout_id: str = "", path: str = "",
               sha256: str = "", signers: dict[str, object] | None = None) -> None:
        """Remember a successful install as installed; audit and log every outcome
        (`_audit`: the roll-out, target path and sha256, and who signed it, if known).

        Never raises: the outcome is what happened, and goes to the coordinator as it
        is. installed.json or an audit line that cannot be written (a full disk) is
        logged at ERROR, naming the file and what it does not hold."""
        if outcome.ok:
            where = self.state_dir / "updates" / "installed.json"
            try:
                installed = self.installed()
                installed[f"{outcome.kind}/{outcome.name}"] = outcome.version
                write_json(where, installed)
            except (OSError, ValueError) as exc:  # ValueError: unreadable JSON
                log.error("%s %s %s is installed, but %s cannot be written (%s): it does "
                          "not list it, so a roll-out of this version asks to install it "
                          "again", outcome.kind, outcome.name, outcome.version, where, exc)
        self._audit_or_log(outcome, rollout_id=rollout_id, path=path, sha256=sha256,
                           signers=signers)

    def _audit_or_log(self, outcome: InstallOutcome, *, rollout_id: str, path: str,
                      sha256: str, signers: dict[str, object] | None) -> None:
        """`_audit`, with a line that cannot be written logged at ERROR (the file, and
        the outcome it lacks) instead of raised: an audit that fails never changes
        what the coordinator is told."""
        try:
            self._audit(outcome, rollout_id=rollout_id, path=path, sha256=sha256,
                        signers=signers)
        except OSError as exc:
            what = " ".join(p for p in (outcome.kind, outcome.name, outcome.version) if p) \
                or path or "update"
            log.error("cannot append to %s (%s): the audit trail lacks the outcome of "
                      "roll-out %s, %s %s: %s", self.state_dir / "updates" / AUDIT, exc,
                      rollout_id or "-", what, "installed" if outcome.ok else "refused",
                      outcome.detail[:AUDIT_DETAIL_MAX])

    def _install_app(self, spec: tuf_repo.TargetSpec, archive: Path) -> str:
        """Unpack the app archive into ``apps/<name>/<version>`` and switch ``current``.

        Raises: ValueError: a corrupt archive, or a member that
            `fedge.update.ab.check_members` refuses (nothing is extracted then).
        """
        base = self.state_dir / "apps" / spec.name
        dest = base / spec.version
        tmp = base / f".{spec.version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                extract_checked(tar, tmp)  # regular files and directories only
        except (tarfile.TarError, OSError, UnsafeArchive, KeyError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"app {spec.name} {spec.version}: bad archive: {exc}") from exc
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        link = base / "current"
        before = os.readlink(link) if link.is_symlink() else None
        link_tmp = base / ".current.tmp"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(spec.version)
        link_tmp.replace(link)
        self._prune_apps(base, keep={spec.version, before})
        return f"app {spec.name} {spec.version} installed at {dest}"

    @staticmethod
    def _prune_apps(base: Path, keep: set[str | None]) -> None:
        """Remove the versions of one app under `base` other than `keep` (`current`
        and the one it replaced), and staging folders a crash left. Never raises: the
        install is done, a version left behind is logged."""
        try:
            found = list(base.iterdir())
        except OSError as exc:
            log.warning("cannot list %s to remove replaced app versions: %s", base, exc)
            return
        for path in found:
            name = path.name
            staged = name.startswith(".") and name.endswith(".tmp") and path.is_dir()
            if name in keep or not (staged or (path.is_dir() and not path.is_symlink()
                                               and tuf_repo.is_version(name))):
                continue
            try:
                shutil.rmtree(path)
            except OSError as exc:
                log.warning("cannot remove the replaced app version %s: %s", path, exc)

    def _audit(self, outcome: InstallOutcome, *, rollout_id: str, path: str, sha256: str,
               signers: dict[str, object] | None) -> None:
        """Log `outcome` (a refusal at WARNING) and append it to ``updates/audit.jsonl``
        (fields: AUDIT_FIELDS; unknown ones null), on disk (fsynced) before the outcome
        is reported. A line a crash cut short is ended first, so that it spoils only
        itself (`audit_log` skips it). Past AUDIT_ROTATE_BYTES the file is rotated
        first (`_rotate_audit`).

        Raises: OSError: the line cannot be written."""
        what = " ".join(p for p in (outcome.kind, outcome.name, outcome.version) if p) \
            or path or "update"
        log.log(logging.INFO if outcome.ok else logging.WARNING,
                "update %s (roll-out %s)%s: %s", what, rollout_id or "-",
                "" if outcome.ok else " refused", outcome.detail)
        signed = signers or {}
        record = {
            "time": self.clock().isoformat(), "rollout_id": rollout_id or None,
            "kind": outcome.kind or None, "name": outcome.name or None,
            "version": outcome.version or None, "path": path or None,
            "sha256": sha256 or None, "ok": outcome.ok, "rolled_back": outcome.rolled_back,
            "detail": outcome.detail[:AUDIT_DETAIL_MAX],
            **{k: signed.get(k) for k in ("targets_version", "targets_signed_by",
                                          "root_version")},
        }
        line = json.dumps(record, sort_keys=True) + "\n"
        audit = self.state_dir / "updates" / AUDIT
        audit.parent.mkdir(parents=True, exist_ok=True)
        with _AUDIT_LOCK:  # the rotation and the append, as one
            self._rotate_audit(audit)
            with open(audit, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _rotate_audit(audit: Path) -> None:
        """Once `audit` holds AUDIT_ROTATE_BYTES, rename it to ``audit.jsonl.1``
        (replacing the one rotated before) so that the next line starts a new file:
        the two together stay under twice that, whatever a coordinator makes this
        appliance refuse.

        Raises: OSError: the rename cannot be made."""
        try:
            size = audit.stat().st_size
        except FileNotFoundError:
            return
        if size < AUDIT_ROTATE_BYTES:
            return
        older = audit.with_name(AUDIT + ".1")
        os.replace(audit, older)
        dir_fd = os.open(audit.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("%s reached %d bytes: moved to %s, a new one begins", audit, size,
                 older.name)

    def audit_log(self) -> list[dict[str, object]]:
        """The audited outcomes, oldest first (``audit.jsonl.1``, then ``audit.jsonl``),
        each with every field of AUDIT_FIELDS: one a line written before it was kept
        reads as None. A line that is not a JSON record (cut short by a crash or a power
        cut while it was appended) is skipped and logged. Safe while the agent rotates
        the file (`read_snapshot`: no record read twice, none lost between the two).

        Raises: AuditUnreadable: a file exists but cannot be read (names it)."""
        audit = self.state_dir / "updates" / AUDIT
        rotated = audit.with_name(AUDIT + ".1")
        # the current file first: renamed to .1 after it is opened, it is read once
        now, older = read_snapshot([audit, rotated])
        records = []
        for path, data in ((rotated, older), (audit, now)):
            if data is not None:
                records.extend(self._audit_records(path, data))
        return records

    @staticmethod
    def _audit_records(path: Path, data: bytes) -> list[dict[str, object]]:
        records = []
        for number, record in json_lines(data):
            if isinstance(record, ValueError):
                log.warning("%s line %d is not an audit record (a write cut short?): "
                            "skipped (%s)", path, number, record)
                continue
            for field in AUDIT_FIELDS:
                record.setdefault(field, None)
            records.append(record)
        return records


def json_lines(data: bytes) -> Iterator[tuple[int, dict[str, Any] | ValueError]]:
    """(line number, the JSON object on it) for each non-blank line of a JSON-lines
    record file, or the ValueError saying why a line is none (a write cut short by a
    crash or a power cut, or one being written now)."""
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are
            yield number, exc
            continue
        yield number, record


class AuditUnreadable(OSError):
    """A record file of the audit trail exists but cannot be read (names it)."""


SNAPSHOT_TRIES = 20  # read_snapshot's opens, while rotations keep overtaking them


def read_snapshot(paths: list[Path]) -> list[bytes | None]:
    """Each file's bytes (None where there is none), every file opened before any is
    read, and a file renamed onto the next between two opens (the update audit's
    rotation, by the running agent) read once: a file is left out when an earlier one
    of `paths` is the same file. Give the current audit file before its ``.1``.

    Two rotations between two opens would pair the current file with a newer ``.1``
    (its records after the current one's): the opens are made again while a file
    opened is neither at one of `paths` any more nor the same as a later one opened
    (at most SNAPSHOT_TRIES times; an agent rotates once per AUDIT_ROTATE_BYTES).

    Raises: AuditUnreadable: a file exists but cannot be opened or read (names it)."""
    for _ in range(SNAPSHOT_TRIES - 1):
        fds = _open_all(paths)
        if _consistent(paths, fds):
            return _read_once(paths, fds)
        _close_all(fds)
    return _read_once(paths, _open_all(paths))


def _open_all(paths: list[Path]) -> list[int | None]:
    fds: list[int | None] = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, os.O_RDONLY))
            except FileNotFoundError:
                fds.append(None)
            except OSError as exc:
                raise AuditUnreadable(f"{path} cannot be read: {exc.strerror or exc}") from exc
    except BaseException:
        _close_all(fds)
        raise
    return fds


def _close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _consistent(paths: list[Path], fds: list[int | None]) -> bool:
    """Whether each file opened but the last is still at one of `paths`, or is a later
    one opened (renamed onto the next path between the two opens): no file was
    rotated away twice between the opens (what becomes of the last after its open
    does not matter; a check made late may also find an earlier one rotated twice
    since, and the opens are made again for nothing)."""
    def ident(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    there = set()
    for path in paths:
        try:
            there.add(ident(os.stat(path)))
        except OSError:
            continue
    opened = [ident(os.fstat(fd)) if fd is not None else None for fd in fds]
    return all(o is None or o in there or o in opened[i + 1:]
               for i, o in enumerate(opened[:-1]))


def _read_once(paths: list[Path], fds: list[int | None]) -> list[bytes | None]:
    """read_snapshot's reading of the files `fds` opened (closed after)."""
    try:
        seen: set[tuple[int, int]] = set()
        out: list[bytes | None] = []
        for path, fd in zip(paths, fds, strict=True):
            if fd is None:
                out.append(None)
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    out.append(None)
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.fdopen(os.dup(fd), "rb") as f:
                    out.append(f.read())
            except OSError as exc:  # a directory in its place: IsADirectoryError
                raise AuditUnreadable(f"{path} cannot be read: {exc.strerror or exc}") from exc
        return out
    finally:
        _close_all(fds)


def retryable(outcome: UpdateOutcome) -> bool:
    """Whether `outcome` is a refusal for expired metadata, or a fetch the connection
    lost (`FetchTransportError`): worth trying again when the roll-out asks again (a
    clock put right, the coordinator re-signing, the link back), so not kept as this
    roll-out's final answer."""
    return not outcome.ok and (outcome.detail.startswith(EXPIRED_DETAIL)
                               or transport_failure(outcome))


def _expired_detail(updater: Updater, exc: ExpiredMetadataError) -> str:
    """What python-tuf's ExpiredMetadataError means, in clock terms: this appliance's
    clock, the role that expired and when (read from the metadata it holds; said so
    when it cannot be read), and what to do."""
    trusted = updater._trusted_set
    now = trusted.reference_time
    role, signed = None, None
    # the order python-tuf checks them in; the first expired one is what it refused
    for name in ("root", "timestamp", "snapshot", "targets"):
        md = trusted.get(name)
        if md is not None and md.is_expired(now):
            role, signed = name, md
            break
    if role is None:  # refused before it was trusted ("New targets is expired")
        text = str(exc)
        role = next((n for n in ("root", "timestamp", "snapshot", "targets") if n in text),
                    "some")
    stamp = now.astimezone(UTC).replace(microsecond=0).isoformat()
    if signed is not None:
        ago = _span(now - signed.expires)
        what = (f"{role} metadata v{signed.version} (signed by {_SIGNED_BY[role]}) expired "
                f"at {signed.expires.isoformat()}, {ago} before this clock's reading")
        if role != "root":  # signed for a fixed lifetime: when, by its signer's clock
            signed_at = (signed.expires - tuf_repo.EXPIRY[role]).isoformat()
            what += f" (signed at about {signed_at} by {_SIGNED_BY[role]}'s clock)"
    else:
        who = f" (signed by {_SIGNED_BY[role]})" if role in _SIGNED_BY else ""
        what = (f"{role} metadata{who} is expired by this clock (python-tuf: {exc}; its "
                "expiry could not be read)")
    return (f"this appliance's clock reads {stamp}; {what}; if this clock or the "
            "coordinator's/console's is wrong, fix it (NTP/RTC) and push again (asked "
            "again, this appliance tries again); if every clock is right, "
            f"{_SIGNED_BY.get(role, 'the signer')} did not re-sign it in time, or the "
            "coordinator withholds newer metadata (a freeze attack)")


def _span(delta: timedelta) -> str:
    """A timedelta in words: "3 days 2 h", "5 h 4 min", "40 s"."""
    s = int(delta.total_seconds())
    if s >= 86400:
        days = s // 86400
        return f"{days} day{'s' if days > 1 else ''} {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min"
    return f"{s} s"


def _lineage(spec: tuf_repo.TargetSpec) -> tuple[str, str]:
    return tuf_repo.lineage(spec.kind, spec.name)


def _download_name(path: str) -> str:
    """The file under tuf/targets/ that a target's download goes to."""
    return path.replace("/", "__")


def _prune_models(models: ModelInstaller, name: str) -> None:
    """Keep the newest `KEEP_LOADED` (2) versions of model `name` that `fedge
    serve` serves (its own load and checks; a newer one that fails them stays, and
    does not count) in the serving repository: each older one is retired (renamed out
    of `fedge serve`'s view, in one rename) and then deleted, so a pushed model that
    passes the checker but cannot be served never costs the site the last one that
    can. Nothing to do for an installer that is not (or does not wrap) a
    `fedge.serve.repository.ModelRepository`. Never raises: the install is done, a
    version left behind is logged."""
    from fedge.serve.repository import ModelRepository
    from fedge.serve.runtime import KEEP_LOADED  # the versions fedge serve keeps loaded

    repo = next((r for r in (models, getattr(models, "repository", None))
                 if isinstance(r, ModelRepository)), None)
    if repo is None:
        return
    try:
        versions = repo.versions(name)
    except (OSError, ValueError) as exc:
        log.warning("cannot list the versions of model %s to remove old ones: %s", name, exc)
        return
    servable, old = 0, []
    for version in reversed(versions):
        if servable >= KEEP_LOADED:
            old.append(version)
        elif _servable(name, version, repo.path(name, version)):
            servable += 1
        else:
            log.warning("version %d of model %s is not one fedge serve serves: kept, and "
                        "the older versions it can serve are kept too", version, name)
    for version in old:
        try:
            shutil.rmtree(repo.retire(name, version))
        except (OSError, ValueError) as exc:
            log.warning("cannot remove version %d of model %s: %s", version, name, exc)


def _servable(name: str, version: int, path: Path) -> bool:
    """Whether `fedge serve` would serve the model at ``path``: its own load and
    checks (session, served types, a finite smoke inference)."""
    from fedge.serve.runtime import ModelLoadError, load_model

    try:
        load_model(name, version, path, threads=1)
    except ModelLoadError:
        return False
    return True


def _named_target(path: str) -> tuf_repo.TargetSpec | None:
    """The (kind, name, version) that a target path names, unverified: a path the
    verified metadata does not list (the console lists only the newest of each
    lineage) may only be refused or found already here, never installed."""
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) != 4:
        return None
    kind, name, version, filename = parts
    try:
        tuf_repo.target_path(kind, name, version, filename)
    except ValueError:
        return None
    return tuf_repo.TargetSpec(kind, name, version, path, 0, "")


def release_version(version: str) -> Version | None:
    """A version read from outside the verified metadata (installed.json, the running
    software's), in PEP 440 order (how software slots are ordered, and so "1.2" ==
    "1.2.0"), or None if it is not a PEP 440 version. Every signed target version
    (`tuf_repo.version_key`'s dotted integers) is one, in the same order."""
    try:
        return Version(version)
    except InvalidVersion:
        return None


def install_trusted_root(state_dir: Path, root: bytes) -> None:
    """Write the enrolment's TUF root as the agent's trusted root.

    Raises: ValueError if `root` is not root metadata signed by its own root key.
    """
    md = tuf_repo.load(root, "root")
    tuf_repo.verify_by(md, "root", md)
    write_atomic(Path(state_dir) / "tuf" / "metadata" / "root.json", root)


def handle_update_available(updater: AgentUpdater, msg: UpdateAvailable, *,
                            models: ModelInstaller | None = None,
                            service: Service | None = None,
                            health_deadline_s: float = 30.0) -> UpdateOutcome:
    """The agent's answer to the coordinator's UpdateAvailable: verify, install, report.

    Blocking (python-tuf is synchronous): from asyncio, run it in an executor.
    Never raises: every failure is an outcome with its reason. Every outcome is
    audited (``updates/audit.jsonl``) and logged, a refusal at WARNING. Expired metadata is
    refused with this appliance's clock and the role's expiry in the reason (a wrong
    clock anywhere reads like a freeze attack), and is `retryable`.
    """
    spec = _named_target(msg.path)  # until verified, what the path names
    try:
        specs = {s.path: s for s in updater.refresh()}
        verified = specs.get(msg.path)
        if verified is None:
            # No longer listed (a newer version replaced it), or never signed: the
            # version named may still be what is installed here (a roll-out asked
            # again after a newer push: nothing to do), or older than one signed.
            refused = None if spec is None else updater.refusal(spec, list(specs.values()))
            if refused is not None:
                return updater.conclude(msg, spec, *refused)
            return updater.conclude(
                msg, spec, False,
                f"target {msg.path!r} is not in the verified targets metadata")
        spec = verified
        refused = updater.refusal(spec, list(specs.values()))
        if refused is not None:
            return updater.conclude(msg, spec, *refused)
        outcome = updater.install(spec, models=models, service=service,
                                  health_deadline_s=health_deadline_s,
                                  rollout_id=msg.rollout_id)
    except Exception as exc:  # verification refused, coordinator unreachable, ...
        return updater.conclude(msg, spec, False, f"{type(exc).__name__}: {exc}")
    return UpdateOutcome(msg.rollout_id, msg.path, outcome.ok, outcome.rolled_back,
                         outcome.detail)


class AgentUpdateClient:
    """Signed updates inside the agent process, over its existing connection.

    The agent's message loop passes every body for which `wants(body)` is true
    to `handle(body)`. An UpdateAvailable starts verification and installation
    in an executor thread (python-tuf is synchronous); the thread's fetches go
    out through `send` as UpdateFetchRequests, and the UpdateFetchReplies that
    come back resolve them. The outcome is sent back as UpdateOutcome.
    """

    def __init__(self, updater: AgentUpdater, send: Callable[[Any], Awaitable[None]], *,
                 models: ModelInstaller | None = None, service: Service | None = None,
                 executor: Executor | None = None, reply_timeout_s: float = 30.0,
                 health_deadline_s: float = 30.0, self_update: SelfUpdate | None = None,
                 restart: Callable[[], None] | None = None,
                 fetch_attempts: int = FETCH_ATTEMPTS,
                 held_round: Callable[[], tuple[str, int] | None] | None = None,
                 restart_wait_s: float = RESTART_WAIT_S) -> None:
        """`held_round`: the (job, round) the agent works for, None when idle
        (`fedge.agent.runtime.Agent.held_round`); a staged software update restarts
        when it is None, or after `restart_wait_s` whatever it says.

        Raises: ValueError if reply_timeout_s or restart_wait_s is not positive or
        fetch_attempts < 1."""
        if not reply_timeout_s > 0:
            raise ValueError(f"reply_timeout_s {reply_timeout_s!r} must be > 0")
        if not restart_wait_s > 0:
            raise ValueError(f"restart_wait_s {restart_wait_s!r} must be > 0")
        if fetch_attempts < 1:
            raise ValueError(f"fetch_attempts {fetch_attempts!r} must be >= 1")
        self.updater = updater
        self._send = send
        self.models = models
        self.service = service
        self.executor = executor
        self.reply_timeout_s = reply_timeout_s
        self.fetch_attempts = fetch_attempts
        self.health_deadline_s = health_deadline_s
        self._pending: dict[tuple[str, int], asyncio.Future[UpdateFetchReply]] = {}
        # resolved when the coordinator asks again for a roll-out being installed: it
        # saw this site come back, so a request in flight may have died with the old
        # connection and is sent again at once (`_request`)
        self._asked_again: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy: asyncio.Lock | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.outcomes: list[UpdateOutcome] = []
        self._inflight: set[str] = set()  # roll-outs being installed now
        self.skew: SkewDecision | None = None
        # Software the agent itself runs: staged, then the unit restarts; the new
        # version confirms on its first HeartbeatAck (see fedge.update.ab.SelfUpdate).
        self.self_update = self_update
        self.restart = restart or _systemd_restart
        self.held_round = held_round or (lambda: None)
        self.restart_wait_s = restart_wait_s
        self._idle: asyncio.Event | None = None  # set by `agent_idle` while a restart waits
        self._acked = False
        # the first ack's confirm and outcome are on disk (`on_heartbeat_ack`); the
        # last failure's text, so that a disk that stays full is logged once
        self._settled = False
        self._settle_error: str | None = None
        updater.fetcher = ZmqFetcher(self.roundtrip)

    def note_coordinator_version(self, coordinator_version: str) -> SkewDecision:
        """Compare with the coordinator's version (from its HeartbeatAck); log once
        per change when this appliance must update or is refused."""
        from fedge.update.ab import running_version

        try:  # the slot the launcher runs (its own code: SelfUpdate.confirm checks it)
            decision = check_version_skew(coordinator_version, running_version())
        except ValueError as exc:
            decision = SkewDecision(False, False, str(exc))
        if decision != self.skew:
            self.skew = decision
            if not decision.accepted:
                log.error("version skew: %s", decision.reason)
            elif decision.update_required:
                log.warning("version skew: %s", decision.reason)
        return decision

    @staticmethod
    def wants(body: object) -> bool:
        return isinstance(body, UpdateAvailable | UpdateFetchReply)

    async def handle(self, body: object) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(body, UpdateFetchReply):
            fut = self._pending.pop((body.path, body.offset), None)
            if fut is not None and not fut.done():
                fut.set_result(body)
        elif isinstance(body, UpdateAvailable):
            # Asked again (the coordinator reconnected or restarted): an install of the
            # same roll-out still running, or a software update waiting for its
            # restarted version to confirm, reports on its own; nothing starts twice.
            rid = body.rollout_id
            if rid in self._inflight or (self.self_update is not None
                                         and self.self_update.awaiting(rid)):
                log.info("roll-out %s asked again while its install is under way; its "
                         "outcome follows when done", rid)
                if rid in self._inflight and self._asked_again is not None \
                        and not self._asked_again.done():
                    self._asked_again.set_result(None)  # resend what is unanswered
                return
            self._inflight.add(rid)
            task = asyncio.ensure_future(self._install(body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(lambda _t: self._inflight.discard(rid))

    async def _install(self, msg: UpdateAvailable) -> None:
        if self._busy is None:
            self._busy = asyncio.Lock()
        async with self._busy:  # one install at a time
            loop = asyncio.get_running_loop()
            again = self.updater.reported(msg.rollout_id)
            if again is not None:
                log.info("roll-out %s asked again: sending the outcome already reported "
                         "(%s)", msg.rollout_id, again.detail)
                await self._report(again)
                return
            if self.self_update is not None:
                staged = await loop.run_in_executor(self.executor, self._stage_software, msg)
                if isinstance(staged, str):
                    await self._restart_when_idle(staged)
                    return  # the restarted version reports the outcome
                if isinstance(staged, UpdateOutcome):
                    await self._report(staged)
                    return
            outcome = await loop.run_in_executor(
                self.executor, lambda: handle_update_available(
                    self.updater, msg, models=self.models, service=self.service,
                    health_deadline_s=self.health_deadline_s))
            await self._report(outcome)  # audited and logged by handle_update_available

    async def _report(self, outcome: UpdateOutcome) -> None:
        """Keep `outcome` on disk (a coordinator that lost it asks again), then send it."""
        try:
            self.updater.note_reported(outcome)
        except OSError:  # a full disk must not keep the outcome from the coordinator
            log.exception("cannot keep the outcome of roll-out %s", outcome.rollout_id)
        self.outcomes.append(outcome)
        await self._send(outcome)

    def agent_idle(self) -> None:
        """The agent's word that it holds no round now: a restart waiting for that
        checks at once (the gap between two rounds may be short)."""
        if self._idle is not None:
            self._idle.set()

    async def _restart_when_idle(self, version: str, why: str | None = None) -> None:
        """Restart into the staged `version` once the agent works for no round
        (`held_round` None, still so `RESTART_SETTLE_S` later), or after
        `restart_wait_s` whatever it works for. `why` begins each log line (default
        "software VERSION staged")."""
        what = why or f"software {version} staged"
        held = self.held_round()
        if held is None:
            log.warning("%s; restarting into it", what)
            self.restart()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.restart_wait_s
        log.warning("%s; restarting after round %d of job %s ends (in %g s at most)", what,
                    held[1], held[0], self.restart_wait_s)
        while True:
            self._idle = asyncio.Event()
            left = deadline - loop.time()
            if left <= 0:
                log.warning("%s; %g s later, round %d of job %s is not over: restarting "
                            "into it now (the round goes on without this site)", what,
                            self.restart_wait_s, held[1], held[0])
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(left, IDLE_POLL_S))
            now = self.held_round()
            if now is None:
                await asyncio.sleep(min(RESTART_SETTLE_S, max(0.0, deadline - loop.time())))
                now = self.held_round()
                if now is None:
                    log.warning("%s; round %d of job %s is over: restarting into it", what,
                                held[1], held[0])
                    break
            if now != held:
                log.warning("%s; round %d of job %s began first: restarting after it ends",
                            what, now[1], now[0])
                held = now
        self._idle = None
        self.restart()

    async def resume_deferred_trial(self, version: str, *, every_s: float | None = None
                                    ) -> None:
        """While this process runs the version before `version`, whose trial the
        launcher deferred (`SelfUpdate.deferred_trial`: its slot root could not be
        written, so its start could not be counted), look every `every_s` (default
        `DEFERRED_CHECK_S`), off the event loop, whether a start could count it now
        (`SelfUpdate.trial_countable`); once one can, restart as after a staged
        update (`_restart_when_idle`: once the round in hand is over), so that the
        next start goes on with the trial. Nothing else would: `confirm` leaves a
        deferred trial alone, so the agent ran the old version until someone
        restarted it, refusing every push meanwhile as "on trial". Returns, without
        restarting, if `version` is no longer on trial."""
        assert self.self_update is not None
        root = self.self_update.root
        every = DEFERRED_CHECK_S if every_s is None else every_s
        said: str | None = None
        while True:
            await asyncio.sleep(every)
            try:
                countable = await asyncio.to_thread(self.self_update.trial_countable,
                                                    version)
            except OSError as exc:
                text = f"{exc.strerror or exc}: {exc.filename or root}"
                if text != said:
                    log.info("software %s's trial stays deferred: %s cannot be written "
                             "(%s); looked at again every %g s", version, root, text, every)
                said = text
                continue
            if not countable:
                log.info("software %s is no longer on trial in %s: no deferred trial to "
                         "resume", version, root)
                return
            break
        await self._restart_when_idle(
            version, f"software {version}'s trial, deferred while {root} could not be "
                     "written, can go on: it can be written again")

    def _stage_software(self, msg: UpdateAvailable) -> str | UpdateOutcome | None:
        """Stage a software target for the restart (`_restart_when_idle`): the version
        staged, an outcome if refused, None if `msg` is not software."""
        assert self.self_update is not None
        spec = None
        try:
            specs = self.updater.refresh()
            spec = {s.path: s for s in specs}.get(msg.path)
            if spec is None or spec.kind != "software":
                return None
            # An older target may still be listed (signed by an earlier console): a
            # push of one must not roll the appliance back, nor re-stage (and so
            # unpack over) the running slot.
            refused = self.updater.refusal(spec, specs)
            if refused is not None:
                return self.updater.conclude(msg, spec, *refused)
            # what the outcome's audit line, written after the restart, says of it
            write_json(self.updater.state_dir / "updates" / STAGED, {
                "rollout_id": msg.rollout_id, "path": msg.path, "version": spec.version,
                "sha256": spec.sha256, "signers": self.updater.signers})
            try:
                bundle = self.updater.download(spec)
                self.self_update.stage(spec.version, bundle, rollout_id=msg.rollout_id,
                                       path=msg.path, name=spec.name)
            finally:  # unpacked into its slot, or refused: not needed again
                self.updater.discard_downloads(spec)
        except Exception as exc:  # refused by TUF, bad bundle: nothing switched
            with contextlib.suppress(OSError):
                (self.updater.state_dir / "updates" / STAGED).unlink(missing_ok=True)
            # refused at refresh, the target not yet known: software or not, this
            # refusal is the outcome (handle_update_available would refuse it the same)
            return self.updater.conclude(msg, spec or _named_target(msg.path), False,
                                         f"{type(exc).__name__}: {exc}")
        return str(spec.version)

    @property
    def confirmed(self) -> bool:
        """Whether a heartbeat ack has come since this process started."""
        return self._acked

    async def on_heartbeat_ack(self) -> None:
        """First ack after start: a pending software update is healthy — keep it —
        and whatever outcome the last update left is reported now. Until that is on
        disk (a full or read-only disk refuses it: logged in one line naming the slot
        root), each later ack tries again; `confirmed` is set by the first ack
        whatever became of it."""
        if self.self_update is None:
            return
        self._acked = True
        if self._settled:
            return
        if self._busy is None:
            self._busy = asyncio.Lock()
        async with self._busy:  # not beside an install (the slot root's lock is the floor)
            if self._settled:  # an ack that waited on the lock behind the one that did it
                return
            root = self.self_update.root
            try:
                # in a thread: the confirm removes old software slots (a bundled venv is
                # a GB of small files), which must not stall heartbeats and messages
                await asyncio.to_thread(self.self_update.confirm)
                out = self.self_update.take_outcome()
            except OSError as exc:
                text = f"{exc.strerror or exc}: {exc.filename or root}"
                (log.error if text != self._settle_error else log.debug)(
                    "software update: cannot record this start's confirmation or take the "
                    "last update's outcome in %s (%s); tried again at the next heartbeat "
                    "ack", root, text)
                self._settle_error = text
                return
            self._settled = True
            if self._settle_error is not None:
                log.info("software update: recorded in %s after all", root)
        if out is None:
            return
        outcome = UpdateOutcome(str(out.get("rollout_id", "")), str(out.get("path", "")),
                                bool(out.get("ok")), bool(out.get("rolled_back")),
                                str(out.get("detail", "")))
        version = str(out.get("version", ""))
        name = str(out.get("name") or tuf_repo.SOFTWARE_NAME)  # staged before names were kept
        staged = self._take_staged(outcome.rollout_id, version)
        signers = staged.get("signers")
        # never raises (an audit line the disk has no room for is logged): the outcome,
        # taken from disk above, is reported whatever the audit
        self.updater.record(InstallOutcome("software", name, version, outcome.ok,
                                           outcome.rolled_back, outcome.detail),
                            rollout_id=outcome.rollout_id, path=outcome.path,
                            sha256=str(staged.get("sha256") or ""),
                            signers=signers if isinstance(signers, dict) else None)
        await self._report(outcome)

    def _take_staged(self, rollout_id: str, version: str) -> dict[str, Any]:
        """What `_stage_software` kept of the software update whose outcome this is
        (the same roll-out and version), once; {} if nothing (staged by a release
        that kept nothing, or unreadable: the audit line then lacks sha256 and
        signers)."""
        path = self.updater.state_dir / "updates" / STAGED
        try:
            doc = json.loads(path.read_text())
            path.unlink()
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): the audit line of roll-out %s lacks its "
                        "sha256 and signers", path, exc, rollout_id)
            with contextlib.suppress(OSError):
                path.unlink()
            return {}
        if not isinstance(doc, dict) or (doc.get("rollout_id"), doc.get("version")) != (
                rollout_id, version):
            return {}
        return doc

    async def _request(self, req: UpdateFetchRequest) -> UpdateFetchReply:
        """Send `req` until its reply comes: again after `reply_timeout_s` without one,
        at once when the coordinator asks again for the roll-out (this site
        reconnected), `fetch_attempts` times at most. A reply to an earlier try
        answers a later one (the same (path, offset) read); a second is dropped.

        Raises: FetchTransportError: no reply to any try."""
        assert self._loop is not None
        key = (req.path, req.offset)
        fut: asyncio.Future[UpdateFetchReply] = self._loop.create_future()
        self._pending[key] = fut
        try:
            why = ""
            for attempt in range(1, self.fetch_attempts + 1):
                if attempt > 1:
                    log.warning("fetch %s@%d: %s; sending the request again (try %d of "
                                "%d)", req.path, req.offset, why, attempt,
                                self.fetch_attempts)
                why = await self._try(req, fut)
                if fut.done():
                    return fut.result()
        finally:
            if self._pending.get(key) is fut:
                del self._pending[key]
        raise FetchTransportError(
            f"fetch {req.path}@{req.offset}: {why}, after {self.fetch_attempts} tries; "
            "the connection to the coordinator was lost or is down (nothing installed; "
            "asked again, this appliance tries again)")

    async def _try(self, req: UpdateFetchRequest, fut: asyncio.Future[UpdateFetchReply]
                   ) -> str:
        """One send of `req` and the wait for `fut`; why it went unanswered ("" if not)."""
        if self._asked_again is None or self._asked_again.done():
            self._asked_again = asyncio.get_running_loop().create_future()
        asked_again = self._asked_again
        try:
            async with asyncio.timeout(self.reply_timeout_s):
                await self._send(req)  # waits while the link is down
                await asyncio.wait({fut, asked_again}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            return f"no reply within {self.reply_timeout_s:g} s"
        except (RuntimeError, OSError) as exc:  # NotConnected: the socket was replaced
            await asyncio.sleep(min(FETCH_RETRY_PAUSE_S, self.reply_timeout_s))
            return f"the request could not be sent ({exc})"
        if fut.done():
            return ""
        return ("the coordinator asked for the roll-out again (this site reconnected: "
                "the request may have been lost with the old connection)")

    def roundtrip(self, req: UpdateFetchRequest) -> UpdateFetchReply:
        """Called from the executor thread: one request, its reply (sent again as
        `_request` says), or DownloadError.

        Raises: FetchTransportError (a DownloadError): no reply after every try."""
        if self._loop is None:
            raise DownloadError("update client not attached to the agent's event loop")
        bound = self.fetch_attempts * (self.reply_timeout_s + FETCH_RETRY_PAUSE_S) + 5
        try:
            return asyncio.run_coroutine_threadsafe(self._request(req), self._loop).result(
                bound)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:  # a stalled loop
            raise FetchTransportError(f"fetch {req.path}@{req.offset}: no reply within "
                                      f"{bound:g} s") from exc


def attach_update_client(agent: Any, state_dir: Path, *, models: ModelInstaller | None = None,
                         service: Service | None = None, reply_timeout_s: float = 30.0,
                         software_root: Path | None = None,
                         restart: Callable[[], None] | None = None,
                         restart_wait_s: float = RESTART_WAIT_S) -> AgentUpdateClient:
    """Give a `fedge.agent.runtime.Agent` signed updates: UpdateAvailable and
    UpdateFetchReply go to an `AgentUpdateClient`, everything else to the agent.

    `models` defaults to the serving repository under ``<state_dir>/models``.
    Software updates of the agent itself are on when its unit starts it through
    ``python -m fedge.update.ab exec`` (which sets ``FEDGE_SOFTWARE_ROOT``, also when
    it runs the packaged install: a fresh appliance takes its first update), or when
    `software_root` already has a ``current`` link. The slot root is `software_root`,
    else the launcher's, else ``<state_dir>/software``. A staged software update
    restarts the agent once it works for no round (`Agent.held_round`), or after
    `restart_wait_s`.

    Raises:
        FileNotFoundError: the appliance was never enrolled (no trusted TUF root).
    """
    if models is None:
        from fedge.serve.repository import ModelRepository

        models = ModelRepository(Path(state_dir) / "models")
    launcher_root = os.environ.get(SOFTWARE_ROOT_ENV)
    root = Path(software_root or launcher_root or Path(state_dir) / "software")
    under_launcher = launcher_root is not None and Path(launcher_root) == root
    self_update = SelfUpdate(root) if under_launcher or (root / "current").is_symlink() else None
    client = AgentUpdateClient(AgentUpdater(state_dir), agent.send, models=models,
                               service=service, executor=getattr(agent, "executor", None),
                               reply_timeout_s=reply_timeout_s, self_update=self_update,
                               restart=restart, held_round=getattr(agent, "held_round", None),
                               restart_wait_s=restart_wait_s)
    if hasattr(agent, "on_idle"):
        agent.on_idle = client.agent_idle
    inner = agent.handle

    async def handle(env: Any) -> None:
        if client.wants(env.body):
            await client.handle(env.body)
            return
        coordinator_version = getattr(env.body, "coordinator_version", None)
        if isinstance(coordinator_version, str):  # HeartbeatAck: check version skew
            client.note_coordinator_version(coordinator_version)
            await client.on_heartbeat_ack()
        await inner(env)

    agent.handle = handle
    agent.update_client = client
    return client


AGENT_UNIT = "fedge-agent.service"


RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: the unit's Restart=on-failure starts us again


def _systemd_restart() -> None:
    """Restart into the staged slot by leaving with status 75.

    The agent runs unprivileged (User=fedge, NoNewPrivileges, no polkit rule), so it
    cannot `systemctl restart` its own unit; systemd's Restart=on-failure (and
    RestartForceExitStatus=75) starts it again: ExecStartPre's preflight counts the
    trial, ExecStart runs the `current` slot. The stage is already on disk (atomic
    rename), so nothing is lost by leaving here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(RESTART_EXIT_CODE)
