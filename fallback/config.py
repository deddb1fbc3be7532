"""Daemon configuration: an IBM aspera.conf-style ``<CONF version="2">`` XML file.

Element names follow Aspera's wherever Aspera has the setting, so operators can reuse what they
know. Loading never stops at the first mistake: every problem found is collected with its
``FILE:LINE`` so a broken file is fixed in one edit instead of one daemon restart per typo.
XML is parsed through defusedxml because the file may be edited by people other than the one
running the daemon: entity declarations (expansion bombs, file/URL inclusion) are refused and
reported as an ordinary problem rather than a traceback or a hang.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

from fallback.confxml import (  # noqa: F401 - Problem is re-exported
    _MAX_BYTES,
    Problem,
    _Bad,
    _bind_host,
    _block_size,
    _bool,
    _choice,
    _existing_dir,
    _host,
    _int_range,
    _Node,
    _Parse,
    _parse_xml,
    _password_hash,
    _port,
    _q,
    _rate,
    _readable_file,
    _state_dir,
    _suffix,
    _user_name,
    bind_error,
    hash_warning,
)
from transport.blocks.envelope import SUFFIX as ENVELOPE_SUFFIX

__all__ = ["Config", "ConfigError", "FlowConfig", "Problem", "UserConfig", "embedded_defaults",
           "load_config"]




JOURNAL_SUFFIX = ".fallback-journal"
"""The journal suffix of releases that kept partials beside their targets. Journals now live
in the state folder (``parts/<hash>.journal``), but a suffix that could make a temporary file
look like an old journal (or an envelope) is still refused, so no name of ours can ever be
taken for another of ours by an older client or a person cleaning up."""

MAX_SUFFIX_BYTES = 64
"""Longest ``partial_file_suffix`` in bytes (UTF-8): the temporary name a cross-device
commit makes beside its target is ``.`` + 16 hex digits + the suffix."""
_RESERVED_SUFFIXES = ((JOURNAL_SUFFIX, "journal", "a journal"),
                      (ENVELOPE_SUFFIX, "envelope", "an encrypted file"))


def _partial_suffix(name: str, text: str, base: Path) -> str:
    """A suffix for partial files that can never name another file the daemon keeps.

    The partial of ``T`` is ``.T<suffix>`` and the journal ``.T.fallback-journal``;
    when one suffix ends the other, some file's partial *is* some file's journal
    (suffix ``journal``: the partial of ``x.fallback-`` is the journal of ``x``),
    and a resumed transfer writes blocks into its own journal. The same holds
    for the envelope suffix ``.fallback-env`` (an encrypted upload of ``.x`` is
    stored as ``.x.fallback-env``).
    """
    text = _suffix(name, text, base)
    if len(text.encode()) > MAX_SUFFIX_BYTES:
        raise _Bad(f"{name}: {len(text.encode())} bytes, at most {MAX_SUFFIX_BYTES} (a file's "
                   "name plus its suffix must stay within the 255-byte name limit)")
    for reserved, what, victim in _RESERVED_SUFFIXES:
        if text.endswith(reserved) or reserved.endswith(text):
            raise _Bad(f"{name}: {_q(text)} collides with the {what} suffix {_q(reserved)} "
                       f"(a partial file could take the name of {victim}); choose another, "
                       "e.g. the default .fallback-partial")
    return text


class ConfigError(Exception):
    """Raised by :func:`load_config` with *every* problem found, in file order."""

    problems: tuple[Problem, ...]

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the exception picklable (e.g. across multiprocessing) despite the custom __init__.
        return (ConfigError, (self.problems,))


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """Bandwidth policy for one direction; rates in Kbps as Aspera counts them, 0 = unlimited."""

    target_rate_kbps: int
    min_rate_kbps: int
    policy: str


@dataclass(frozen=True, slots=True)
class UserConfig:
    """A login; the hash is kept verbatim so the auth module decides how to verify it."""

    name: str
    password_hash: str
    docroot: Path
    read_allowed: bool
    write_allowed: bool


@dataclass(frozen=True, slots=True)
class Config:
    """Effective settings after defaults are applied; ``sources`` says where each one came from."""

    path: Path | None
    state_dir: Path
    http_port: int
    https_port: int
    enable_http: bool
    enable_https: bool
    cert_file: Path | None
    key_file: Path | None
    cert_names: tuple[str, ...]  # extra names/addresses for a generated certificate
    bind_address: str
    session_activity_timeout: int
    restartable_transfers: bool
    streams_max: int
    header_timeout: int
    keepalive_timeout: int
    connections_max: int
    connections_per_address_max: int
    sessions_per_user_max: int
    bind_ip_address: str | None
    bind_udp_port: int
    flow_in: FlowConfig
    flow_out: FlowConfig
    content_protection_required: bool
    content_protection_strong_pass_required: bool
    allowed_cipher: str
    block_size: int
    partial_file_suffix: str
    partial_file_retention: int  # seconds; 0 = keep abandoned partials forever
    overwrite: str
    fsync: bool
    default_docroot: Path | None
    users: tuple[UserConfig, ...]
    sources: Mapping[str, str] = field(compare=False)
    enable_udp: bool = True  # ``serve --no-udp``: HTTP(S) only
    warnings: tuple[Problem, ...] = field(default=(), compare=False)
    """Things that do not stop ``serve`` but need a look (weak password hashes, a port
    taken right now); ``config validate`` and ``serve`` print them."""

    @property
    def shared_port(self) -> bool:
        """True when one TCP port serves both HTTP and HTTPS (TLS is sniffed per connection)."""
        return self.enable_http and self.enable_https and self.http_port == self.https_port

    def user(self, name: str) -> UserConfig | None:
        """The user called ``name`` (case-sensitive), or None."""
        return next((u for u in self.users if u.name == name), None)


# --------------------------------------------------------------------------- schema


def _cert_names(name: str, text: str, base: Path) -> tuple[str, ...]:
    """Names and addresses, separated by spaces or commas; ``*.example.com`` wildcards allowed."""
    out = []
    for token in re.split(r"[\s,]+", text.strip()):
        if token:
            _host(name, token.removeprefix("*."), base)  # raises _Bad naming the token
            out.append(token)
    return tuple(out)



@dataclass(frozen=True, slots=True)
class _Leaf:
    parse: _Parse
    default: Any = None
    empty_is_unset: bool = False  # `<cert_file/>` means "not set"; `<http_port/>` is a mistake


@dataclass(frozen=True, slots=True)
class _Repeated:
    schema: _Schema


_Schema: TypeAlias = "dict[str, _Leaf | _Repeated | _Schema]"

_FLOW: _Schema = {
    "target_rate": _Leaf(_rate, 0),
    "min_rate": _Leaf(_rate, 0),
    "policy": _Leaf(_choice("fixed", "high", "fair", "low"), "fair"),
}
_USER: _Schema = {
    "name": _Leaf(_user_name),
    "password_hash": _Leaf(_password_hash),
    "docroot": _Leaf(_existing_dir, None, True),
    "read_allowed": _Leaf(_bool, True),
    "write_allowed": _Leaf(_bool, True),
}
_SCHEMA: _Schema = {
    "server": {"state_dir": _Leaf(_state_dir, None, True)},
    "http_server": {
        "http_port": _Leaf(_port, 8080),
        "https_port": _Leaf(_port, 8443),
        "enable_http": _Leaf(_bool, False),
        "enable_https": _Leaf(_bool, True),
        "cert_file": _Leaf(_readable_file, None, True),
        "key_file": _Leaf(_readable_file, None, True),
        "cert_names": _Leaf(_cert_names, (), True),
        "bind_address": _Leaf(_bind_host, "0.0.0.0"),
        "session_activity_timeout": _Leaf(_int_range(0, None), 0),
        "restartable_transfers": _Leaf(_bool, True),
        "streams_max": _Leaf(_int_range(1, 256), 16),
        "header_timeout": _Leaf(_int_range(1, 3600), 30),
        "keepalive_timeout": _Leaf(_int_range(1, 3600), 60),
        "connections_max": _Leaf(_int_range(1, 1_000_000), 4096),
        "connections_per_address_max": _Leaf(_int_range(1, 1_000_000), 256),
        "sessions_per_user_max": _Leaf(_int_range(1, 100_000), 32),
    },
    "transfer": {
        "protocol_options": {
            "bind_ip_address": _Leaf(_bind_host, None, True),
            "bind_udp_port": _Leaf(_port, 33001),
        },
        "in": {"bandwidth": {"flow": _FLOW}},
        "out": {"bandwidth": {"flow": _FLOW}},
        "encryption": {
            "content_protection_required": _Leaf(_bool, False),
            "content_protection_strong_pass_required": _Leaf(_bool, False),
            "allowed_cipher": _Leaf(_choice("any", "aes-128-gcm", "aes-256-gcm"), "aes-256-gcm"),
        },
    },
    "file_system": {
        "block_size": _Leaf(_block_size, 4 * 1024 * 1024),
        "partial_file_suffix": _Leaf(_partial_suffix, ".fallback-partial"),
        "partial_file_retention": _Leaf(_int_range(0, None), 7 * 24 * 3600),
        "overwrite": _Leaf(_choice("allow", "deny"), "allow"),
        "fsync": _Leaf(_bool, True),
        "docroot": _Leaf(_existing_dir, None, True),
    },
    "users": {"user": _Repeated(_USER)},
}


def _index(schema: _Schema, where: tuple[str, ...], defaults: dict[str, Any],
           homes: dict[str, list[str]]) -> None:
    """Flatten the schema into per-key defaults and tag -> parent paths (for "belongs in")."""
    for tag, spec in schema.items():
        homes.setdefault(tag, []).append("/".join(where) or "CONF")
        if isinstance(spec, _Leaf):
            defaults[".".join((*where, tag))] = spec.default
        elif isinstance(spec, _Repeated):
            _index(spec.schema, (*where, tag), {}, homes)
        else:
            _index(spec, (*where, tag), defaults, homes)


_DEFAULTS: dict[str, Any] = {}
_HOMES: dict[str, list[str]] = {}
_index(_SCHEMA, (), _DEFAULTS, _HOMES)


# --------------------------------------------------------------------------- loading


@dataclass(slots=True)
class _Found:
    """Values read from one element subtree (the whole file, or one <user>)."""

    line: int
    vals: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    items: list[_Found] = field(default_factory=list)


class _Loader:
    def __init__(self, file: str, base: Path) -> None:
        self.file = file
        self.base = base
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    def warning(self, line: int, message: str) -> None:
        self.warnings.append(Problem(self.file, line, "warning: " + message))

    def load(self, root: _Node) -> _Found:
        found = _Found(root.line)
        if root.tag != "CONF":
            self.problem(root.line, f'root element is <{root.tag}>, expected <CONF version="2">')
            return found
        version = root.attrib.get("version")
        if version is None:
            self.problem(root.line, '<CONF> has no version attribute; expected version="2"')
        elif version.strip() != "2":
            self.problem(root.line, f'<CONF> version is {_q(version)}, expected "2"')
        self._walk(root, _SCHEMA, "", found, allowed_attrs=("version",))
        self._cross_check(found)
        return found

    def _check_node(self, node: _Node, allowed_attrs: tuple[str, ...] = ()) -> None:
        for attr, value in node.attrib.items():
            if attr not in allowed_attrs:
                self.problem(node.line, f"unexpected attribute {attr}={_q(value)} on <{node.tag}>")

    def _walk(self, node: _Node, schema: _Schema, prefix: str, found: _Found,
              allowed_attrs: tuple[str, ...] = ()) -> None:
        self._check_node(node, allowed_attrs)
        text = "".join(node.text).strip()
        if text:
            self.problem(node.line, f"<{node.tag}> contains text {_q(text)}; "
                         "it may only contain elements")
        seen: dict[str, int] = {}
        for child in node.children:
            spec = schema.get(child.tag)
            if spec is None:
                self._unknown(child, node.tag, schema)
            elif isinstance(spec, _Repeated):
                item = _Found(child.line)
                self._walk(child, spec.schema, "", item)
                found.items.append(item)
            elif child.tag in seen:
                self.problem(child.line, f"<{child.tag}> is repeated in <{node.tag}> "
                             f"(first at line {seen[child.tag]})")
            else:
                seen[child.tag] = child.line
                key = prefix + child.tag
                found.lines[key] = child.line
                if isinstance(spec, _Leaf):
                    self._leaf(child, spec, key, found)
                else:
                    self._walk(child, spec, key + ".", found)

    def _unknown(self, node: _Node, parent: str, schema: _Schema) -> None:
        message = f"unknown element <{node.tag}> in <{parent}>"
        homes = _HOMES.get(node.tag)
        close = difflib.get_close_matches(node.tag, list(schema), n=1)
        if homes:  # right name, wrong place: saying where it goes beats a fuzzy guess
            message += f"; <{node.tag}> belongs in " + " or ".join(f"<{h}>" for h in homes)
        elif close:
            message += f"; did you mean <{close[0]}>?"
        self.problem(node.line, message)

    def _leaf(self, node: _Node, spec: _Leaf, key: str, found: _Found) -> None:
        self._check_node(node)
        if node.children:
            self.problem(node.line, f"<{node.tag}> must contain a value, "
                         f"not elements (found <{node.children[0].tag}>)")
            found.bad.add(key)
            return
        text = "".join(node.text).strip()
        if not text:
            if spec.empty_is_unset:
                found.vals[key] = None
            else:
                self.problem(node.line, f"{node.tag}: value is empty")
                found.bad.add(key)
            return
        try:
            found.vals[key] = spec.parse(node.tag, text, self.base)
        except _Bad as exc:
            self.problem(node.line, str(exc))
            found.bad.add(key)

    def _cross_check(self, found: _Found) -> None:
        """Rules spanning several elements; skipped where a part is already reported as bad."""
        vals, lines, bad = found.vals, found.lines, found.bad

        def get(key: str) -> Any:
            return vals.get(key, _DEFAULTS[key])

        cert, key = "http_server.cert_file", "http_server.key_file"
        for have, lack in ((cert, key), (key, cert)):
            if get(have) is not None and get(lack) is None and lack not in bad:
                self.problem(lines[have], f"{have.split('.')[1]} is set but "
                             f"{lack.split('.')[1]} is not: give both, or neither to use a "
                             "generated self-signed certificate")
        flags = ("http_server.enable_http", "http_server.enable_https")
        if not any(get(f) for f in flags) and not bad.intersection(flags):
            self.problem(lines.get("http_server", 1), "neither enable_http nor enable_https is "
                         "true: the daemon would serve nothing")
        for way in ("in", "out"):
            flow = f"transfer.{way}.bandwidth.flow."
            target, floor = get(flow + "target_rate"), get(flow + "min_rate")
            if target and floor > target and flow + "target_rate" not in bad:
                self.problem(lines[flow + "min_rate"], f"min_rate: {floor} Kbps exceeds "
                             f"target_rate {target} Kbps in <{way}>")
        no_docroot = get("file_system.docroot") is None and "file_system.docroot" not in bad
        first: dict[str, int] = {}
        for user in found.items:
            name = user.vals.get("name")
            if name is None and "name" not in user.bad:
                self.problem(user.line, "<user> has no <name>")
            elif name is not None and name in first:
                self.problem(user.lines["name"], f"duplicate user name {_q(name)} "
                             f"(first defined at line {first[name]})")
            elif name is not None:
                first[name] = user.lines["name"]
            who = "<user>" if name is None else f"user {_q(name)}"
            if "password_hash" not in user.vals and "password_hash" not in user.bad:
                self.problem(user.line, f"{who} has no <password_hash>")
            if user.vals.get("docroot") is None and "docroot" not in user.bad and no_docroot:
                self.problem(user.line, f"{who} has no <docroot> and <file_system>/<docroot> "
                             "is not set")
            weak = hash_warning(user.vals.get("password_hash"))
            if weak:
                self.warning(user.lines["password_hash"], f"{who}: {weak}")
        if not bad:  # what `serve` does at start, tried now: if this passes, serve starts
            self._listen_check(get, lines)
            self._tls_check(get, lines)

    def _listen_check(self, get: Callable[[str], Any], lines: dict[str, int]) -> None:
        """The ports ``serve`` listens on, bound (and closed) now with the configured
        address: a port it may not use (below 1024 without the privilege, an address not
        of this host) is a problem. A port in use is no problem of the file: the running
        daemon itself holds it (validating before a SIGHUP reload), and ``serve`` names a
        port it cannot bind when it starts."""
        host = get("http_server.bind_address")
        ports = []
        if get("http_server.enable_http"):
            ports.append("http_server.http_port")
        if get("http_server.enable_https") and not (
                ports and get("http_server.https_port") == get("http_server.http_port")):
            ports.append("http_server.https_port")
        for key in ports:
            port = get(key)
            line = lines.get(key) or lines.get("http_server", 1)
            exc = bind_error(host, port)
            if exc is None:
                continue
            why = exc.strerror or str(exc)
            if exc.errno != errno.EADDRINUSE:
                self.problem(line, f"{key.split('.')[1]}: cannot listen on {host}:{port}: {why}"
                             + (" (ports below 1024 need privileges)"
                                if exc.errno == errno.EACCES else ""))

    def _tls_check(self, get: Callable[[str], Any], lines: dict[str, int]) -> None:
        """The certificate and key ``serve`` loads for HTTPS: PEM, readable, matching; or
        the generated pair kept in ``state_dir``, which must be creatable and, when it
        exists, usable."""
        if not get("http_server.enable_https"):
            return
        from fallback.tls import _load_existing, fingerprint, server_ssl_context

        cert, key = get("http_server.cert_file"), get("http_server.key_file")
        if cert is not None and key is not None:
            try:  # the certificate alone first: "Unable to load PEM file" beats "[SSL] PEM lib"
                fingerprint(cert)
                server_ssl_context(cert, key)
            except (ValueError, OSError) as exc:
                why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
                self.problem(lines["http_server.cert_file"], f"cert_file: cannot use {cert} "
                             f"with key_file {key}: {why} (PEM certificate and its key)")
            return
        state = get("server.state_dir") or self.base / "fallback-state"
        line = lines.get("server.state_dir") or lines.get("server", 1)
        made, parent = state / "cert.pem", state
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            self.problem(line, f"state_dir: cannot create {state} ({parent} is not a writable "
                         "folder): the generated TLS certificate is kept there")
        elif made.exists() and (state / "key.pem").exists():
            try:
                _load_existing(made, state / "key.pem")
            except (ValueError, OSError) as exc:
                why = getattr(exc, "strerror", None) or exc
                self.problem(line, f"state_dir: the generated certificate {made} cannot be "
                             f"used ({why}): remove cert.pem and key.pem there to generate "
                             "a new pair")


def _config(path: Path | None, base: Path, vals: Mapping[str, Any], sources: dict[str, str],
            users: tuple[UserConfig, ...]) -> Config:
    def get(key: str) -> Any:
        return vals[key] if key in vals else _DEFAULTS[key]

    def flow(way: str) -> FlowConfig:
        prefix = f"transfer.{way}.bandwidth.flow."
        return FlowConfig(get(prefix + "target_rate"), get(prefix + "min_rate"),
                          get(prefix + "policy"))

    return Config(
        path=path,
        state_dir=get("server.state_dir") or base / "fallback-state",
        http_port=get("http_server.http_port"),
        https_port=get("http_server.https_port"),
        enable_http=get("http_server.enable_http"),
        enable_https=get("http_server.enable_https"),
        cert_file=get("http_server.cert_file"),
        key_file=get("http_server.key_file"),
        cert_names=get("http_server.cert_names") or (),
        bind_address=get("http_server.bind_address"),
        session_activity_timeout=get("http_server.session_activity_timeout"),
        restartable_transfers=get("http_server.restartable_transfers"),
        streams_max=get("http_server.streams_max"),
        header_timeout=get("http_server.header_timeout"),
        keepalive_timeout=get("http_server.keepalive_timeout"),
        connections_max=get("http_server.connections_max"),
        connections_per_address_max=get("http_server.connections_per_address_max"),
        sessions_per_user_max=get("http_server.sessions_per_user_max"),
        bind_ip_address=get("transfer.protocol_options.bind_ip_address"),
        bind_udp_port=get("transfer.protocol_options.bind_udp_port"),
        flow_in=flow("in"),
        flow_out=flow("out"),
        content_protection_required=get("transfer.encryption.content_protection_required"),
        content_protection_strong_pass_required=get(
            "transfer.encryption.content_protection_strong_pass_required"),
        allowed_cipher=get("transfer.encryption.allowed_cipher"),
        block_size=get("file_system.block_size"),
        partial_file_suffix=get("file_system.partial_file_suffix"),
        partial_file_retention=get("file_system.partial_file_retention"),
        overwrite=get("file_system.overwrite"),
        fsync=get("file_system.fsync"),
        default_docroot=get("file_system.docroot"),
        users=users,
        sources=MappingProxyType(sources),
    )


_USER_DEFAULTS = {k: v.default for k, v in _USER.items() if isinstance(v, _Leaf)}
_USER_KEYS = tuple(_USER_DEFAULTS)
_FLOW_ATTRS = {"target_rate": "target_rate_kbps", "min_rate": "min_rate_kbps", "policy": "policy"}


def load_config(path: str | Path) -> Config:
    """Read, parse and validate ``path``; raise :class:`ConfigError` listing every problem."""
    file = str(path)
    absolute = Path(os.path.abspath(path))
    try:
        with open(absolute, "rb") as fh:
            data = fh.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(file, 0, f"cannot read: {exc.strerror or exc}")]) from None
    if len(data) > _MAX_BYTES:
        raise ConfigError([Problem(file, 0, f"cannot read: larger than {_MAX_BYTES} bytes")])
    root = _parse_xml(data, file)
    if isinstance(root, Problem):
        raise ConfigError([root])
    loader = _Loader(file, absolute.parent)
    found = loader.load(root)
    if loader.problems:
        raise ConfigError(sorted(loader.problems, key=lambda p: p.line))

    def where(found_in: _Found, key: str) -> str:
        return f"{file}:{found_in.lines[key]}" if key in found_in.vals else "default"

    sources = {key: where(found, key) for key in _DEFAULTS}
    default_docroot = found.vals.get("file_system.docroot")
    users = []
    for item in found.items:
        vals = {k: item.vals.get(k, default) for k, default in _USER_DEFAULTS.items()}
        if vals["docroot"] is None:
            vals["docroot"] = default_docroot
        users.append(UserConfig(**vals))
        for k in _USER_KEYS:
            sources[f"users.user[{vals['name']}].{k}"] = where(item, k)
        if item.vals.get("docroot") is None:
            sources[f"users.user[{vals['name']}].docroot"] = sources["file_system.docroot"]
    config = _config(absolute, absolute.parent, found.vals, sources, tuple(users))
    return dataclasses.replace(config, warnings=tuple(sorted(loader.warnings,
                                                             key=lambda p: p.line)))


def embedded_defaults(base_dir: Path, password_hash: str | None = None) -> Config:
    """Settings for ``fallback serve`` without a config file: loopback only, so an unconfigured
    daemon is never reachable from the network; one ``demo`` user if a hash is given."""
    base = Path(os.path.abspath(base_dir))
    data = base / "fallback-data"
    vals = {
        "server.state_dir": data,
        "http_server.bind_address": "127.0.0.1",
        "http_server.enable_http": True,
        "http_server.enable_https": True,
        "file_system.docroot": data / "docroot",
    }
    sources = dict.fromkeys(_DEFAULTS, "default")
    users: tuple[UserConfig, ...] = ()
    if password_hash:
        users = (UserConfig("demo", password_hash, data / "docroot", True, True),)
        sources.update((f"users.user[demo].{k}", "default") for k in _USER_KEYS)
    return _config(None, base, vals, sources, users)
