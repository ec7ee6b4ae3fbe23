"""Socket options shared by the server and client sockets."""

from __future__ import annotations

import errno
import ipaddress
import math
import re
import socket
import threading

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from fedge.transport.heartbeat import ZMTP_TIMEOUT_FLOOR, HeartbeatConfig

#: Bytes CurveZMQ adds to a frame on the wire ("\x07MESSAGE", nonce, MAC, flags),
#: which ZMQ_MAXMSGSIZE counts; rounded up.
CURVE_FRAME_OVERHEAD = 64

#: ZMQ_RCVHWM, in messages, per connection (libzmq's default, set explicitly).
#: It must not be small: when a connection's pipe is full libzmq stops reading
#: it, and libzmq 4.3.5 then aborts the whole process (assertion ``!_io_error``
#: in stream_engine_base.cpp) if that peer closes its connection.  A stalled
#: event loop fills the pipe with the peer's heartbeats (16 s at a 1 s interval
#: with a HWM of 16; the agent then gives up and closes), so a small HWM turned a
#: long coordinator stall into a crash.  Bigger messages are bounded by the
#: server's reader (whole-message limit) and its byte-bounded queue instead.
RCVHWM = 1000

#: The largest ZMQ_HEARTBEAT_TTL libzmq takes, in milliseconds: it keeps the TTL
#: in deciseconds in a uint16 (options.cpp), so 65535 * 100 + 99 ms; above it
#: setsockopt fails with EINVAL.  ``apply_common`` sets the TTL (and
#: ZMQ_HEARTBEAT_TIMEOUT) to ``max(timeout_s, ZMTP_TIMEOUT_FLOOR)`` in ms.
HEARTBEAT_TTL_MAX_MS = 65535 * 100 + 99
#: The largest heartbeat ``timeout_s`` the sockets can be given (6553.599 s).
HEARTBEAT_TTL_MAX_S = HEARTBEAT_TTL_MAX_MS / 1000
#: ZMQ_HEARTBEAT_IVL and ZMQ_HEARTBEAT_TIMEOUT are C ints of milliseconds.
HEARTBEAT_IVL_MAX_MS = 2**31 - 1
#: The largest heartbeat ``interval_s`` the sockets can be given (2147483.647 s).
HEARTBEAT_IVL_MAX_S = HEARTBEAT_IVL_MAX_MS / 1000

EVENT_NAMES = {
    getattr(zmq, n): n.removeprefix("EVENT_") for n in dir(zmq) if n.startswith("EVENT_")
}


def message_limit_for_model(n_params: int, itemsize: int = 4, *, headroom: int = 1 << 20) -> int:
    """A message size limit for a job whose model has ``n_params`` parameters.

    The largest message carries the model (or one update) once, plus headers
    and metadata within ``headroom`` bytes.  Use it for both the socket's
    ``max_message_bytes`` and ``fedge.wire.decode(max_bytes=...)``.

    Raises:
        ValueError: a negative or non-int count, or a non-positive itemsize/headroom.
    """
    if not isinstance(n_params, int) or n_params < 0:
        raise ValueError(f"n_params {n_params!r} must be an int >= 0")
    if not isinstance(itemsize, int) or itemsize <= 0:
        raise ValueError(f"itemsize {itemsize!r} must be a positive int")
    if not isinstance(headroom, int) or headroom <= 0:
        raise ValueError(f"headroom {headroom!r} must be a positive int")
    return n_params * itemsize + headroom


def check_endpoint(endpoint: object, *, bind: bool = False) -> str:
    """A ZeroMQ endpoint fedge can dial: ``tcp://HOST:PORT`` or ``ipc://PATH``.

    HOST is a host name (`host_problem`: labels of letters, digits, '-' and '_', split
    by '.'), an IPv4 address, or an IPv6 address in brackets (``tcp://[::1]:7700``).
    With ``bind``, HOST may also be ``*`` (every address) and PORT ``0`` or ``*`` (any
    free port). libzmq refuses other text only when a socket connects (EINVAL, inside
    the agent's connection task) or resolves it, so it is refused here, at the edge.

    Raises:
        ValueError: anything else, naming the endpoint and the rule.
    """
    if not isinstance(endpoint, str):
        raise ValueError(f"endpoint {endpoint!r} must be a str like tcp://HOST:PORT")
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint {endpoint!r} must be tcp://HOST:PORT or ipc://PATH")
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    any_port = bind and port in ("0", "*")
    if not sep or not host or not (any_port or (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(
            f"endpoint {endpoint!r} must be tcp://HOST:PORT with PORT in 1..65535"
        )
    problem = host_problem(host, bind=bind)
    if problem is not None:
        raise ValueError(f"endpoint {endpoint!r}: {problem}")
    return endpoint


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_problem(host: str, *, bind: bool = False) -> str | None:
    """What is wrong with HOST of ``tcp://HOST:PORT``, or None.

    Host names are LDH labels (RFC 1123; '_' taken too, as resolvers and libzmq take
    it) of 1..63 characters, 253 in all; a name that is not ASCII must be written in
    its IDNA (``xn--``) form, which the message gives: libzmq takes ASCII only.
    """
    if host == "*":
        return None if bind else "host '*' (every address) is for binding; name the host to dial"
    if "/" in host:
        return (f"host {host!r} holds a '/': the endpoint is tcp://HOST:PORT alone, "
                "without another scheme (https://) or a path")
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else None
        try:
            if inner is None:
                raise ValueError
            ipaddress.IPv6Address(inner)
        except ValueError:
            return (f"host {host!r} is not an IPv6 address in brackets, like "
                    "tcp://[2001:db8::1]:7700")
        return None
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return (f"host {host!r} holds a ':': write tcp://HOST:PORT with one port, and "
                    "an IPv6 address in brackets (tcp://[2001:db8::1]:7700)")
        return (f"the IPv6 address {host} must be in brackets: "
                f"tcp://[{host}]:PORT")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"host {host!r} is not an IPv4 address (four numbers 0..255, like 192.0.2.10)"
        return None
    if not host.isascii():
        try:
            ascii_form = host.encode("idna").decode("ascii")
        except UnicodeError:
            return (f"host name {host!r} is not ASCII and has no IDNA form: ZeroMQ takes "
                    "ASCII names only")
        return (f"host name {host!r} is not ASCII, and ZeroMQ takes ASCII names only: "
                f"write its IDNA form, {ascii_form}")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return (f"host {host!r} is not a host name (labels of letters, digits and '-', "
                "each 1..63 characters, split by '.'), an IPv4 address, or an IPv6 "
                "address in brackets")
    return None


def is_loopback_host(host: str) -> bool:
    """Whether HOST of ``tcp://HOST:PORT`` is this machine itself whoever dials it: a
    loopback address (127.0.0.0/8, ::1, in brackets or not) or ``localhost`` (and
    names under it, RFC 6761). Nothing is resolved."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    name = name.rstrip(".").lower()
    if name in ("localhost", "ip6-localhost", "ip6-loopback", "localhost.localdomain") \
            or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def check_heartbeat(
    interval_s: object, timeout_s: object, *, section: str = "[heartbeat]"
) -> tuple[float, float]:
    """A config's ``[heartbeat] interval_s, timeout_s`` as floats, if the sockets take them.

    Checked here, at load, because a value libzmq refuses only fails when the
    socket is made, inside the client's supervisor task, where nobody sees it.

    Raises:
        ValueError: a value that is not a finite number of seconds, not > 0,
            above what libzmq holds (``HEARTBEAT_IVL_MAX_S``,
            ``HEARTBEAT_TTL_MAX_S``), or a timeout not above the interval;
            the message names ``section`` and the key, e.g.
            "[heartbeat] timeout_s = 7000 is above 6553.599 s, the most
            ZeroMQ's heartbeat TTL holds".
    """
    values: dict[str, float] = {}
    for key, v in (("interval_s", interval_s), ("timeout_s", timeout_s)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{section} {key} = {v!r} must be a number of seconds, like 5.0")
        if not math.isfinite(v) or not v > 0:
            raise ValueError(f"{section} {key} = {v!r} must be a number of seconds > 0")
        values[key] = float(v)
    interval, timeout = values["interval_s"], values["timeout_s"]
    if int(interval * 1000) > HEARTBEAT_IVL_MAX_MS:
        raise ValueError(
            f"{section} interval_s = {interval_s!r} is above {HEARTBEAT_IVL_MAX_S} s, the most "
            "ZeroMQ's heartbeat interval (a C int of milliseconds) holds"
        )
    if int(max(timeout, ZMTP_TIMEOUT_FLOOR) * 1000) > HEARTBEAT_TTL_MAX_MS:
        raise ValueError(
            f"{section} timeout_s = {timeout_s!r} is above {HEARTBEAT_TTL_MAX_S} s, the most "
            "ZeroMQ's heartbeat TTL holds"
        )
    if not timeout > interval:
        raise ValueError(
            f"{section} timeout_s = {timeout_s!r} must exceed interval_s = {interval_s!r}"
        )
    return interval, timeout


def check_max_message_bytes(value: int | None) -> int | None:
    """Raises: ValueError unless ``value`` is None or a positive int."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value <= 0):
        raise ValueError(f"max_message_bytes {value!r} must be a positive int or None")
    return value


def ipv6_for(endpoint: str, *, bind: bool) -> bool:
    """Whether a socket for ``endpoint`` gets ZMQ_IPV6: a client only for an IPv6
    address in brackets (``tcp://[2001:db8::1]:P``); a listening socket (``bind``) also
    for ``*``, every address, which then listens on IPv6 and IPv4 (an IPv6 socket with
    IPV6_V6ONLY off; ``tcp://[::]:P`` the same). Not for a name, an IPv4 address or
    ``0.0.0.0`` (nor ``ipc://``): those keep libzmq's default, IPv4.

    Why not on for every socket: with ZMQ_IPV6 on libzmq resolves a name for IPv6
    (AI_V4MAPPED: its AAAA addresses if it has any) and dials or binds only the first
    address. A name with AAAA and A records -- ``localhost`` with Debian's /etc/hosts
    (``::1 localhost``) -- then reached ::1 alone, and a coordinator bound as packaged,
    ``tcp://0.0.0.0:7700`` (IPv4), was never reached. With it off a name is resolved
    for IPv4 alone, as before 64749ed; a coordinator with IPv6 alone is dialled at its
    address in brackets. With it off libzmq cannot bind or dial an IPv6 address ("No
    such device"), hence on for those. On a kernel without IPv6 libzmq opens an IPv4 socket
    for ``*`` instead (libzmq src/tcp_listener.cpp ``set_address``, src/tcp.cpp
    ``tcp_open_socket``: "try automatic downgrade to IPv4").
    """
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    return host.startswith("[") or (bind and host == "*")


def set_ipv6(sock: zmq.Socket, endpoint: str, *, bind: bool) -> None:
    """ZMQ_IPV6 as `ipv6_for` says, set before ``sock`` binds or connects ``endpoint``."""
    sock.setsockopt(zmq.IPV6, 1 if ipv6_for(endpoint, bind=bind) else 0)


#: How long `listen_address` waits for a name to resolve (a DNS server that does not
#: answer) before it says so.
NAME_LOOKUP_S = 5.0


def listen_address(endpoint: str, *, timeout_s: float = NAME_LOOKUP_S) -> str | None:
    """The address a socket listening at ``endpoint`` (``tcp://HOST:PORT``) takes on
    this host, found as libzmq finds it: HOST resolved for the family `ipv6_for` gives
    it (a name: IPv4; its first address is the one bound), then tried with a throwaway
    socket bound to (address, 0). None for ``*`` (every address) and ``ipc://``. A
    name's lookup runs in a daemon thread, given up after ``timeout_s``. The port is
    not tried: another process may hold it now and not at start.

    Raises:
        ValueError: why not, naming HOST: "fl.example does not resolve here (Name or
            service not known)", "203.0.113.7 is not an address of this host",
            "fl.example resolves here to 203.0.113.7, which is not an address of
            this host".
    """
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    if host == "*":
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    name = host[1:-1] if bracketed else host
    family = socket.AF_INET6 if ipv6_for(endpoint, bind=True) else socket.AF_INET
    try:
        ipaddress.ip_address(name.partition("%")[0])
        literal = True
    except ValueError:
        literal = False
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if literal else 0)
    found: list[list[tuple] | str] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(name, 0, family, socket.SOCK_STREAM, 0, flags))
        except socket.gaierror as exc:
            found.append(exc.strerror or str(exc))
        except (OSError, UnicodeError) as exc:
            found.append(str(exc))

    if literal:
        lookup()
    else:
        worker = threading.Thread(target=lookup, name="fedge-resolve", daemon=True)
        worker.start()
        worker.join(timeout_s)
    if not found:
        raise ValueError(f"{host} does not resolve here (no answer within {timeout_s:g} s)")
    infos = found[0]
    if isinstance(infos, str) or not infos:
        why = infos or "no address"
        if literal:
            raise ValueError(f"{host} cannot be listened on here ({why})")
        raise ValueError(f"{host} does not resolve here ({why})")
    sockaddr = infos[0][4]
    address = str(sockaddr[0])
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(sockaddr)
    except OSError as exc:
        said = host if literal else f"{host} resolves here to {address}, which"
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"{said} is not an address of this host") from None
        raise ValueError(f"{said} cannot be listened on: {exc.strerror or exc}") from None
    return address


def plain_endpoint(endpoint: str) -> str:
    """A bound endpoint as libzmq reports it with ZMQ_IPV6 on, IPv4-mapped addresses
    written as IPv4 (``tcp://[::ffff:127.0.0.1]:P``, bound as such -> ``tcp://127.0.0.1:P``),
    so the endpoint file and the log say what was configured."""
    if endpoint.startswith("tcp://[::ffff:") and "]:" in endpoint:
        inner, _, port = endpoint[len("tcp://["):].partition("]:")
        try:
            v4 = ipaddress.IPv6Address(inner).ipv4_mapped
        except ValueError:
            return endpoint
        if v4 is not None:
            return f"tcp://{v4}:{port}"
    return endpoint


def apply_common(
    sock: zmq.Socket, heartbeat: HeartbeatConfig, max_message_bytes: int | None
) -> None:
    sock.linger = 0
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat.interval * 1000)))
    zmtp_ms = int(heartbeat.effective_zmtp_timeout * 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, zmtp_ms))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, zmtp_ms))
    set_max_message_bytes(sock, max_message_bytes)


def set_max_message_bytes(sock: zmq.Socket, max_message_bytes: int | None) -> None:
    # ZMQ_MAXMSGSIZE limits each (encrypted) frame; a peer exceeding it is
    # disconnected by libzmq.  It applies to connections made after it is set.
    limit = -1 if max_message_bytes is None else max_message_bytes + CURVE_FRAME_OVERHEAD
    sock.setsockopt(zmq.MAXMSGSIZE, limit)


def send_nowait(sock: zmq.asyncio.Socket, frames: list[bytes]) -> BaseException | None:
    """Send without waiting through the asyncio socket; the error, if any.

    Not through a synchronous shadow: a send there makes libzmq process
    pending commands, which can use up the edge of the socket's FD that the
    asyncio reader waits on, and the reader then sleeps while messages pile
    up.  pyzmq's own non-blocking send re-checks for waiting receivers.  With
    another send in flight pyzmq queues this one behind it instead; its
    outcome is then not waited for.
    """
    f = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    if not f.done():
        f.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        return None
    return f.exception()


def parse_event(frames: list[bytes]) -> tuple[str, int]:
    ev = parse_monitor_message(frames)
    return EVENT_NAMES.get(ev["event"], str(ev["event"])), int(ev["value"])
