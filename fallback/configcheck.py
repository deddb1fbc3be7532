"""``fallback config validate FILE``: the effective settings, or every problem at its line.

It loads the file exactly as ``fallback serve`` does (``fallback.config.load_config``), so
a file that validates is one that ``serve`` starts with.
"""

from __future__ import annotations

from typing import TextIO

from fallback.config import _DEFAULTS, _FLOW_ATTRS, _USER_KEYS, Config, ConfigError, load_config


def _effective(config: Config) -> dict[str, object]:
    """Every key of ``config.sources`` mapped to its effective value. Schema keys name the
    Config attribute by their last part, except the flows and the default docroot."""
    values: dict[str, object] = {}
    for key in _DEFAULTS:
        parts = key.split(".")
        if parts[1] in ("in", "out"):
            flow = config.flow_in if parts[1] == "in" else config.flow_out
            values[key] = getattr(flow, _FLOW_ATTRS[parts[-1]])
        elif key == "file_system.docroot":
            values[key] = config.default_docroot
        else:
            values[key] = getattr(config, parts[-1])
    for user in config.users:
        for name in _USER_KEYS:
            values[f"users.user[{user.name}].{name}"] = getattr(user, name)
        values[f"users.user[{user.name}].password_hash"] = "<set>"  # never print hashes
    return values


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "<unset>"
    return "<unset>" if value is None else str(value)


def validate_main(path: str, out: TextIO, err: TextIO) -> int:
    """``fallback config validate FILE``: print effective settings and return 0, or print every
    problem as ``FILE:LINE: message`` and return 2. Warnings (``FILE:LINE: warning: ...``,
    on ``err``) keep 0: ``serve`` starts with them, and prints them too."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return 2
    values = _effective(config)
    for key, source in config.sources.items():
        print(f"{key} = {_show(values[key])}   ({source})", file=out)
    if config.shared_port:
        print(f"note: HTTP and HTTPS share port {config.http_port} "
              "(TLS is recognised per connection)", file=out)
    if not config.users:
        print("warning: no <user> in <users>: nobody can log in", file=out)
    for warning in config.warnings:  # exit status stays 0: serve starts with them
        print(warning, file=err)
    return 0
