"""``rbd:`` names and rbd node options as QEMU 7.2 takes them (block/rbd.c), with no Ceph needed.

``rbd:pool[/namespace]/image[@snapshot][:key=value[:key=value...]]``: ``conf`` names a Ceph
configuration file, ``id`` the client user, every other key is a Ceph option (``mon_host``,
``auth_supported``, ``keyring``, ``client_mount_timeout``...) set in that order. ``\\`` escapes
the next character, so values can hold ``:``, ``@``, ``/`` or ``=``. The same node comes as
``json:{"driver": "rbd", "pool": ..., "image": ...}`` or ``--image-opts driver=rbd,...`` with
QEMU's BlockdevOptionsRbd keys (``pool``, ``namespace``, ``image``, ``snapshot``, ``conf``,
``user``, ``key-secret``, ``auth-client-required``, ``server``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..qdict import qdict_order

PREFIX = "rbd:"

#: BlockdevOptionsRbd members (besides driver); encrypt is refused where it is used
NODE_KEYS = frozenset({"pool", "namespace", "image", "snapshot", "conf", "user", "key-secret",
                       "auth-client-required", "server", "encrypt", "filename", "password-secret",
                       "=keyvalue-pairs"})


def is_rbd_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


@dataclass
class RbdLocation:
    """Where an rbd image is and how to reach the cluster (QEMU's BlockdevOptionsRbd)."""

    pool: str
    image: str
    namespace: str | None = None
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    key_secret: str | None = None
    auth_client_required: list[str] | None = None
    servers: list[tuple[str, str]] = field(default_factory=list)
    keypairs: list[tuple[str, str]] = field(default_factory=list)  # Ceph options, in order
    from_filename: bool = False

    def display_name(self, fmt: str | None = "raw") -> str:
        """The ``json:`` name QEMU gives the opened node (bdrv_refresh_filename): the strong
        runtime options only, so Ceph options from the filename do not appear."""
        node: dict[str, Any] = {"pool": self.pool, "namespace": self.namespace, "image": self.image,
                                "conf": self.conf, "snapshot": self.snapshot, "user": self.user}
        for i, (host, port) in enumerate(self.servers):  # QEMU keeps a node's options flat
            node[f"server.{i}.host"], node[f"server.{i}.port"] = host, port
        node["driver"] = "rbd"
        node = qdict_order({k: v for k, v in node.items() if v is not None})
        top = {"driver": fmt, "file": node} if fmt else node
        return "json:" + json.dumps(top)


def _strchr(s: str, delim: str, start: int = 0) -> int:
    """Index of the first unescaped ``delim`` at or after ``start``, or -1 (qemu_rbd_strchr)."""
    i = start
    while i < len(s):
        if s[i] == delim:
            return i
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        i += 1
    return -1


def _next_tok(s: str, delim: str) -> tuple[str, str | None]:
    """(token before the first unescaped ``delim``, rest after it or None)."""
    i = _strchr(s, delim)
    return (s, None) if i < 0 else (s[:i], s[i + 1:])


def unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        out.append(s[i])
        i += 1
    return "".join(out)


def parse_filename(name: str) -> RbdLocation:
    """An ``rbd:`` filename, split exactly as qemu_rbd_parse_filename splits it."""
    if not is_rbd_name(name):
        raise InvalidArgument("File name must start with 'rbd:'")
    pool, rest = _next_tok(name[len(PREFIX):], "/")
    if rest is None:
        raise InvalidArgument("Pool name is required")
    snapshot = None
    if _strchr(rest, "@") >= 0:
        image, rest = _next_tok(rest, "@")
        snap, rest = _next_tok(rest or "", ":")
        snapshot = unescape(snap)
    else:
        image, rest = _next_tok(rest, ":")
    namespace = ""
    if _strchr(image, "/") >= 0:
        ns, image_rest = _next_tok(image, "/")
        namespace, image = unescape(ns), image_rest or ""
    loc = RbdLocation(pool=unescape(pool), image=unescape(image), namespace=namespace, snapshot=snapshot,
                      from_filename=True)
    while rest is not None:
        key, rest = _next_tok(rest, "=")
        if rest is None:
            raise InvalidArgument(f"conf option {key} has no value")
        key = unescape(key)
        value, rest = _next_tok(rest, ":")
        value = unescape(value)
        if key == "conf":
            loc.conf = value
        elif key == "id":
            loc.user = value
        else:
            loc.keypairs.append((key, value))
    return loc


def from_options(opts: dict[str, Any]) -> RbdLocation:
    """An rbd node given as options (json:/--image-opts/--blockdev), nested already. A node that
    has only ``filename`` is the legacy form: the filename is parsed as an ``rbd:`` name."""
    unknown = set(opts) - NODE_KEYS - {"driver", "node-name", "cache", "read-only", "auto-read-only",
                                       "discard", "detect-zeroes", "force-share"}
    if unknown:
        raise InvalidArgument(f"Invalid parameter '{sorted(unknown)[0]}'")
    if "encrypt" in opts:
        raise InvalidArgument("rbd image encryption is not supported by qcowpy")
    if "filename" in opts and "pool" not in opts:
        loc = parse_filename(str(opts["filename"]))
        loc.key_secret = opts.get("key-secret") or opts.get("password-secret")
        return loc
    for key in ("pool", "image"):
        if key not in opts:
            raise InvalidArgument(f"Parameter '{key}' is missing")
    servers = opts.get("server") or []
    if isinstance(servers, dict):  # --image-opts server.0.host=...: nest() gives {"0": {...}}
        servers = [servers[k] for k in sorted(servers, key=lambda k: int(k) if str(k).isdigit() else 0)]
    for i, srv in enumerate(servers):
        if not isinstance(srv, dict) or "host" not in srv:
            raise InvalidArgument(f"Parameter 'server.{i}.host' is missing")
        if "port" not in srv:
            raise InvalidArgument(f"Parameter 'server.{i}.port' is missing")
    acr = opts.get("auth-client-required")
    if isinstance(acr, dict):
        acr = [acr[k] for k in sorted(acr)]
    if isinstance(acr, str):
        acr = [acr]
    for mode in acr or []:
        if mode not in ("cephx", "none"):
            raise InvalidArgument(f"Parameter 'auth-client-required' does not accept value '{mode}'")
    return RbdLocation(pool=str(opts["pool"]), image=str(opts["image"]),
                       namespace=None if opts.get("namespace") is None else str(opts["namespace"]),
                       snapshot=None if opts.get("snapshot") is None else str(opts["snapshot"]),
                       conf=None if opts.get("conf") is None else str(opts["conf"]),
                       user=None if opts.get("user") is None else str(opts["user"]),
                       key_secret=opts.get("key-secret") or opts.get("password-secret"),
                       auth_client_required=acr,
                       servers=[(str(s["host"]), str(s["port"])) for s in servers])


def mon_host(loc: RbdLocation) -> str | None:
    """``server`` entries as Ceph's mon_host string (qemu_rbd_mon_host)."""
    if not loc.servers:
        return None
    return ";".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in loc.servers)
