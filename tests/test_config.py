"""Tests for fallback.config: values, sources, every problem kind with its exact FILE:LINE text."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import textwrap
from pathlib import Path

import pytest

from fallback.auth import _b64encode, hash_password
from fallback.config import (
    Config,
    ConfigError,
    FlowConfig,
    Problem,
    UserConfig,
    embedded_defaults,
    load_config,
)
from fallback.configcheck import validate_main
from fallback.tls import ensure_self_signed

HASH = hash_password("alice's password")  # real: validate warns about placeholder hashes


def _scrypt(password: str, ln: int = 17, r: int = 8, p: int = 1) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << ln, r=r, p=p,
                            maxmem=256 * 1024 * 1024, dklen=32)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64encode(salt)}${_b64encode(digest)}"


BOB_HASH = _scrypt("bob's password")


def write(directory: Path, text: str, name: str = "aspera.conf") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing ``needle``, so tests never hard-code numbers."""
    hits = [n for n, text in enumerate(path.read_text().splitlines(), 1) if needle in text]
    return hits[nth - 1]


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def conf(body: str) -> str:
    """Wrap element lines in <CONF>, keeping one element per line."""
    return '<?xml version="1.0"?>\n<CONF version="2">\n' + textwrap.dedent(body) + "</CONF>\n"


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    (tmp_path / "srv" / "alice").mkdir(parents=True)
    (tmp_path / "srv" / "bob").mkdir(parents=True)
    (tmp_path / "srv" / "shared").mkdir(parents=True)
    (tmp_path / "tls").mkdir()
    # A real pair: validation loads the certificate and key as `serve` does.
    ensure_self_signed(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem")
    return tmp_path


FULL = """
<?xml version="1.0" encoding="UTF-8"?>
<CONF version="2">
  <!-- a comment is fine -->
  <server>
    <state_dir>state</state_dir>
  </server>
  <http_server>
    <http_port>8081</http_port>
    <https_port> 9443 </https_port>
    <enable_http>YES</enable_http>
    <enable_https>on</enable_https>
    <cert_file>tls/cert.pem</cert_file>
    <key_file>{root}/tls/key.pem</key_file>
    <bind_address>::1</bind_address>
    <session_activity_timeout>300</session_activity_timeout>
    <restartable_transfers>0</restartable_transfers>
    <streams_max>32</streams_max>
  </http_server>
  <transfer>
    <protocol_options>
      <bind_ip_address>127.0.0.1</bind_ip_address>
      <bind_udp_port>33002</bind_udp_port>
    </protocol_options>
    <in>
      <bandwidth>
        <flow>
          <target_rate>100M</target_rate>
          <min_rate>5000</min_rate>
          <policy>High</policy>
        </flow>
      </bandwidth>
    </in>
    <out>
      <bandwidth>
        <flow>
          <target_rate>1G</target_rate>
          <policy>fixed</policy>
        </flow>
      </bandwidth>
    </out>
    <encryption>
      <content_protection_required>true</content_protection_required>
      <content_protection_strong_pass_required>false</content_protection_strong_pass_required>
      <allowed_cipher>aes-128-gcm</allowed_cipher>
    </encryption>
  </transfer>
  <file_system>
    <block_size>1M</block_size>
    <partial_file_suffix>.part</partial_file_suffix>
    <overwrite>deny</overwrite>
    <fsync>off</fsync>
    <docroot>srv/shared</docroot>
  </file_system>
  <users>
    <user>
      <name>alice</name>
      <password_hash>{hash}</password_hash>
      <docroot>{root}/srv/alice</docroot>
      <write_allowed>false</write_allowed>
    </user>
    <user>
      <name>bob</name>
      <password_hash>{bob_hash}</password_hash>
    </user>
  </users>
</CONF>
"""


def test_full_file_values(site: Path) -> None:
    path = write(site, FULL.format(root=site, hash=HASH, bob_hash=BOB_HASH))
    c = load_config(path)
    assert c.path == path
    assert c.state_dir == site / "state"
    assert (c.http_port, c.https_port, c.enable_http, c.enable_https) == (8081, 9443, True, True)
    assert c.cert_file == site / "tls" / "cert.pem" and c.key_file == site / "tls" / "key.pem"
    assert c.bind_address == "::1" and c.session_activity_timeout == 300
    assert c.restartable_transfers is False and c.streams_max == 32
    assert c.bind_ip_address == "127.0.0.1" and c.bind_udp_port == 33002
    assert c.flow_in == FlowConfig(100_000, 5000, "high")
    assert c.flow_out == FlowConfig(1_000_000, 0, "fixed")
    assert c.content_protection_required is True
    assert c.content_protection_strong_pass_required is False
    assert c.allowed_cipher == "aes-128-gcm"
    assert (c.block_size, c.partial_file_suffix, c.overwrite, c.fsync) == (
        1024 * 1024, ".part", "deny", False)
    assert c.default_docroot == site / "srv" / "shared"
    assert c.users == (
        UserConfig("alice", HASH, site / "srv" / "alice", True, False),
        UserConfig("bob", BOB_HASH, site / "srv" / "shared",
                   True, True),
    )
    assert c.user("bob") is c.users[1] and c.user("carol") is None
    assert c.shared_port is False


def test_full_file_sources(site: Path) -> None:
    path = write(site, FULL.format(root=site, hash=HASH, bob_hash=BOB_HASH))
    s = load_config(path).sources
    assert s["http_server.http_port"] == f"{path}:{line_of(path, '<http_port>')}"
    assert s["server.state_dir"] == f"{path}:{line_of(path, '<state_dir>')}"
    assert s["transfer.in.bandwidth.flow.target_rate"] == f"{path}:{line_of(path, '100M')}"
    assert s["transfer.out.bandwidth.flow.min_rate"] == "default"
    assert s["users.user[alice].name"] == f"{path}:{line_of(path, '<name>alice')}"
    assert s["users.user[alice].read_allowed"] == "default"
    # bob inherits file_system/docroot, so his docroot comes from that line
    assert s["users.user[bob].docroot"] == f"{path}:{line_of(path, 'srv/shared')}"


def test_minimal_file_is_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '<CONF version="2"/>')
    c = load_config(path)
    assert c.state_dir == tmp_path / "fallback-state"
    assert (c.http_port, c.https_port, c.enable_http, c.enable_https) == (8080, 8443, False, True)
    assert c.cert_file is None and c.key_file is None and c.bind_address == "0.0.0.0"
    assert (c.session_activity_timeout, c.restartable_transfers, c.streams_max) == (0, True, 16)
    assert c.bind_ip_address is None and c.bind_udp_port == 33001
    assert c.flow_in == c.flow_out == FlowConfig(0, 0, "fair")
    assert (c.content_protection_required, c.allowed_cipher) == (False, "aes-256-gcm")
    assert (c.block_size, c.partial_file_suffix, c.overwrite, c.fsync) == (
        4 * 1024 * 1024, ".fallback-partial", "allow", True)
    assert c.default_docroot is None and c.users == ()
    assert set(c.sources.values()) == {"default"}


def test_empty_optional_elements_mean_unset(tmp_path: Path) -> None:
    path = write(tmp_path, conf("""\
        <http_server><cert_file/><key_file>  </key_file></http_server>
        <transfer><protocol_options><bind_ip_address/></protocol_options></transfer>
        """))
    c = load_config(path)
    assert c.cert_file is None and c.key_file is None and c.bind_ip_address is None
    assert c.sources["http_server.cert_file"] == f"{path}:3"


@pytest.mark.parametrize("true", ["true", "1"])
def test_seed_example_shared_port(tmp_path: Path, true: str) -> None:
    path = write(tmp_path, conf(f"""\
        <http_server>
          <http_port>1234</http_port><https_port>1234</https_port>
          <enable_http>{true}</enable_http><enable_https>{true}</enable_https>
        </http_server>
        """))
    assert load_config(path).shared_port is True
    out, err = io.StringIO(), io.StringIO()
    assert validate_main(str(path), out, err) == 0
    assert err.getvalue() == ""
    assert "note: HTTP and HTTPS share port 1234 (TLS is recognised per connection)\n" in (
        out.getvalue())


def test_shared_port_needs_both_enabled(tmp_path: Path) -> None:
    path = write(tmp_path, conf("""\
        <http_server><http_port>1234</http_port><https_port>1234</https_port></http_server>
        """))
    assert load_config(path).shared_port is False
    out = io.StringIO()
    assert validate_main(str(path), out, io.StringIO()) == 0
    assert "note:" not in out.getvalue()


def test_validate_prints_every_setting(site: Path) -> None:
    path = write(site, FULL.format(root=site, hash=HASH, bob_hash=BOB_HASH))
    out, err = io.StringIO(), io.StringIO()
    assert validate_main(str(path), out, err) == 0
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    config = load_config(path)
    assert len(lines) == len(config.sources)
    assert f"http_server.http_port = 8081   ({path}:{line_of(path, '<http_port>')})" in lines
    assert "transfer.out.bandwidth.flow.min_rate = 0   (default)" in lines
    assert "http_server.enable_http = true" in out.getvalue()
    assert "transfer.protocol_options.bind_udp_port = 33002   (" in out.getvalue()
    assert (f"users.user[alice].password_hash = <set>   "
            f"({path}:{line_of(path, '<password_hash>')})") in lines
    assert "$argon2id$" not in out.getvalue() and "$scrypt$" not in out.getvalue()
    assert f"users.user[alice].docroot = {site / 'srv' / 'alice'}   (" in out.getvalue()


def test_validate_unset_values_are_shown(tmp_path: Path) -> None:
    path = write(tmp_path, '<CONF version="2"/>')
    out = io.StringIO()
    assert validate_main(str(path), out, io.StringIO()) == 0
    assert "http_server.cert_file = <unset>   (default)\n" in out.getvalue()
    assert f"server.state_dir = {tmp_path / 'fallback-state'}   (default)\n" in out.getvalue()


# Each case: (body inside <CONF>, text identifying the reported line, expected message).
PROBLEMS = [
    ("<http_server>\n<htp_port>80</htp_port>\n</http_server>\n", "<htp_port>",
     "unknown element <htp_port> in <http_server>; did you mean <http_port>?"),
    ("<http_port>80</http_port>\n", "<http_port>",
     "unknown element <http_port> in <CONF>; <http_port> belongs in <http_server>"),
    ("<http_server><docroot>/x</docroot></http_server>\n", "<docroot>",
     "unknown element <docroot> in <http_server>; <docroot> belongs in <file_system> or "
     "<users/user>"),
    ("<zzzzzz/>\n", "<zzzzzz/>", "unknown element <zzzzzz> in <CONF>"),
    (f"<users><user><name>a</name><password_hash>{HASH}</password_hash><docroot>/</docroot>\n"
     "<read_alowed>1</read_alowed></user></users>\n", "<read_alowed>",
     "unknown element <read_alowed> in <user>; did you mean <read_allowed>?"),
    (f"<users><user><nmae>a</nmae><password_hash>{HASH}</password_hash><docroot>/</docroot>\n"
     "<name>a</name></user></users>\n", "<nmae>",
     "unknown element <nmae> in <user>; did you mean <name>?"),
    ("<http_server>\n<http_port>80x</http_port>\n</http_server>\n", "80x",
     'http_port: "80x" is not an integer'),
    ("<http_server>\n<enable_http>maybe</enable_http>\n</http_server>\n", "maybe",
     'enable_http: "maybe" is not a boolean (use true/false, yes/no, 1/0)'),
    ("<http_server>\n<https_port>70000</https_port>\n</http_server>\n", "70000",
     "https_port: 70000 is out of range 1-65535"),
    ("<transfer><protocol_options>\n<bind_udp_port>0</bind_udp_port>\n"
     "</protocol_options></transfer>\n", "bind_udp_port",
     "bind_udp_port: 0 is out of range 1-65535"),
    ("<http_server>\n<streams_max>257</streams_max>\n</http_server>\n", "257",
     "streams_max: 257 is out of range 1-256"),
    ("<http_server>\n<session_activity_timeout>-1</session_activity_timeout>\n"
     "</http_server>\n", "-1", "session_activity_timeout: -1 is out of range (must be 0 or more)"),
    ("<http_server>\n<bind_address>not a host</bind_address>\n</http_server>\n", "not a host",
     'bind_address: "not a host" is not an IP address or hostname'),
    ("<http_server>\n<bind_address>999.1.1.1</bind_address>\n</http_server>\n", "999",
     'bind_address: "999.1.1.1" is not an IP address or hostname'),
    ("<http_server>\n<http_port/>\n</http_server>\n", "<http_port/>", "http_port: value is empty"),
    ("<http_server>\n<cert_file>/nonexistent/y.pem</cert_file>\n"
     "<key_file>aspera.conf</key_file>\n</http_server>\n", "y.pem",
     "cert_file: /nonexistent/y.pem does not exist"),
    ("<http_server>\n<enable_https>false</enable_https>\n</http_server>\n", "<http_server>",
     "neither enable_http nor enable_https is true: the daemon would serve nothing"),
    ("<transfer><in><bandwidth><flow>\n<target_rate>fast</target_rate>\n"
     "</flow></bandwidth></in></transfer>\n", "fast",
     'target_rate: "fast" is not a rate (use Kbps, or bits/s with a K/M/G suffix, e.g. 100M)'),
    ("<transfer><out><bandwidth><flow>\n<target_rate>1000</target_rate>\n"
     "<min_rate>2M</min_rate>\n</flow></bandwidth></out></transfer>\n", "2M",
     "min_rate: 2000 Kbps exceeds target_rate 1000 Kbps in <out>"),
    ("<transfer><in><bandwidth><flow>\n<policy>greedy</policy>\n"
     "</flow></bandwidth></in></transfer>\n", "greedy",
     'policy: "greedy" is not one of fixed, high, fair, low'),
    ("<transfer><encryption>\n<allowed_cipher>rc4</allowed_cipher>\n</encryption></transfer>\n",
     "rc4", 'allowed_cipher: "rc4" is not one of any, aes-128-gcm, aes-256-gcm'),
    ("<file_system>\n<block_size>4X</block_size>\n</file_system>\n", "4X",
     'block_size: "4X" is not a size (use bytes, or a K or M suffix, e.g. 4M)'),
    ("<file_system>\n<block_size>128M</block_size>\n</file_system>\n", "128M",
     "block_size: 128M is out of range 64K-64M"),
    ("<file_system>\n<block_size>32K</block_size>\n</file_system>\n", "32K",
     "block_size: 32K is out of range 64K-64M"),
    ("<file_system>\n<block_size>100000</block_size>\n</file_system>\n", "100000",
     "block_size: 100000 is not a multiple of 4096"),
    ("<file_system>\n<overwrite>sometimes</overwrite>\n</file_system>\n", "sometimes",
     'overwrite: "sometimes" is not one of allow, deny'),
    ("<file_system>\n<partial_file_suffix>.x/y</partial_file_suffix>\n</file_system>\n", ".x/y",
     'partial_file_suffix: ".x/y" must not contain a path separator'),
    ("<file_system>\n<partial_file_suffix>" + "p" * 300 + "</partial_file_suffix>\n</file_system>\n",
     "ppp", "partial_file_suffix: 300 bytes, at most 64 (a file's name plus its suffix must "
     "stay within the 255-byte name limit)"),
    ("<file_system>\n<docroot>/nonexistent/docroot</docroot>\n</file_system>\n", "/nonexistent",
     "docroot: /nonexistent/docroot does not exist"),
    ("<http_server>\n<http_port>1</http_port>\n<http_port>2</http_port>\n</http_server>\n",
     "<http_port>2", "<http_port> is repeated in <http_server> (first at line 4)"),
    ("<server/>\n<server/>\n", "<server/>",  # first hit is the first <server/>: see nth below
     "<server> is repeated in <CONF> (first at line 3)"),
    ("<http_server>\n8080\n</http_server>\n", "<http_server>",
     '<http_server> contains text "8080"; it may only contain elements'),
    ('<http_server enabled="1">\n</http_server>\n', "<http_server",
     'unexpected attribute enabled="1" on <http_server>'),
    ("<http_server>\n<http_port>80<x/></http_port>\n</http_server>\n", "<x/>",
     "<http_port> must contain a value, not elements (found <x>)"),
]


@pytest.mark.parametrize(("body", "needle", "message"), PROBLEMS,
                         ids=[m[:40] for _, _, m in PROBLEMS])
def test_problem_kinds(tmp_path: Path, body: str, needle: str, message: str) -> None:
    path = write(tmp_path, conf(body))
    nth = 2 if needle == "<server/>" else 1
    assert problems(path) == [f"{path}:{line_of(path, needle, nth)}: {message}"]


def test_cert_without_key_and_key_without_cert(site: Path) -> None:
    for present, absent in (("cert_file", "key_file"), ("key_file", "cert_file")):
        path = write(site, conf(f"""\
            <http_server>
              <{present}>tls/cert.pem</{present}>
            </http_server>
            """))
        assert problems(path) == [
            f"{path}:4: {present} is set but {absent} is not: give both, or neither to use a "
            "generated self-signed certificate"]


def test_cert_that_is_a_directory(site: Path) -> None:
    path = write(site, conf("""\
        <http_server><cert_file>tls</cert_file><key_file>tls/key.pem</key_file></http_server>
        """))
    assert problems(path) == [f"{path}:3: cert_file: {site / 'tls'} is not a regular file"]


def test_unreadable_key(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Faked through os.access because root (as in CI containers) can read a chmod 0 file.
    real_access = os.access
    key = site / "tls" / "key.pem"
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != key and real_access(p, mode))
    path = write(site, conf("""\
        <http_server><cert_file>tls/cert.pem</cert_file><key_file>tls/key.pem</key_file>
        </http_server>
        """))
    assert problems(path) == [f"{path}:3: key_file: {key} is not readable"]


def test_user_problems(site: Path) -> None:
    path = write(site, conf(f"""\
        <users>
          <user>
            <name>alice</name><password_hash>{HASH}</password_hash>
            <docroot>srv/alice</docroot>
          </user>
          <user>
            <name>alice</name><password_hash>{HASH}</password_hash>
            <docroot>srv/bob</docroot>
          </user>
          <user>
            <name>carol</name><password_hash>{HASH}</password_hash>
          </user>
          <user>
            <password_hash>{HASH}</password_hash><docroot>srv/bob</docroot>
          </user>
          <user>
            <name>dave</name><docroot>srv/bob</docroot>
          </user>
          <user>
            <name>bad name!</name><password_hash>hunter2</password_hash>
            <docroot>srv/nowhere</docroot>
          </user>
        </users>
        """))
    line = line_of
    assert problems(path) == [
        f'{path}:{line(path, "<name>alice", 2)}: duplicate user name "alice" '
        f'(first defined at line {line(path, "<name>alice")})',
        f'{path}:{line(path, "<user>", 3)}: user "carol" has no <docroot> and '
        "<file_system>/<docroot> is not set",
        f"{path}:{line(path, '<user>', 4)}: <user> has no <name>",
        f'{path}:{line(path, "<user>", 5)}: user "dave" has no <password_hash>',
        f'{path}:{line(path, "bad name")}: name: "bad name!" is not a valid user name '
        "(1-64 of A-Z a-z 0-9 . _ -)",
        f'{path}:{line(path, "bad name")}: password_hash: must start with "$argon2id$" or '
        '"$scrypt$"',
        f"{path}:{line(path, 'srv/nowhere')}: docroot: {site / 'srv' / 'nowhere'} does not exist",
    ]
    assert "hunter2" not in "\n".join(problems(path))


def test_user_docroot_falls_back_to_file_system_docroot(site: Path) -> None:
    path = write(site, conf(f"""\
        <file_system><docroot>{site}/srv/shared</docroot></file_system>
        <users><user><name>carol</name><password_hash>{HASH}</password_hash></user></users>
        """))
    assert load_config(path).users[0].docroot == site / "srv" / "shared"


@pytest.mark.parametrize(("root", "message"), [
    ('<conf version="2"/>', 'root element is <conf>, expected <CONF version="2">'),
    ('<CONF version="1"/>', '<CONF> version is "1", expected "2"'),
    ("<CONF/>", '<CONF> has no version attribute; expected version="2"'),
    ('<CONF version="2" mode="x"/>', 'unexpected attribute mode="x" on <CONF>'),
])
def test_root_problems(tmp_path: Path, root: str, message: str) -> None:
    path = write(tmp_path, f'<?xml version="1.0"?>\n\n{root}\n')
    assert problems(path) == [f"{path}:3: {message}"]


def test_malformed_xml_reports_expat_line(tmp_path: Path) -> None:
    path = write(tmp_path, conf("<http_server>\n<http_port>80</http_port>\n</http_sever>\n"))
    assert problems(path) == [f"{path}:5: malformed XML: mismatched tag (column 3)"]


def test_empty_file_is_malformed(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert problems(path) == [f"{path}:1: malformed XML: no element found (column 1)"]


def test_many_problems_reported_together_in_line_order(site: Path) -> None:
    path = write(site, conf("""\
        <http_server>
          <htp_port>80</htp_port>
          <https_port>70000</https_port>
          <enable_http>maybe</enable_http>
          <enable_https>no</enable_https>
        </http_server>
        <file_system><block_size>3M7</block_size></file_system>
        <users><user><name>x</name></user></users>
        """))
    found = problems(path)
    assert [int(p.split(":")[1]) for p in found] == [4, 5, 6, 9, 10, 10]
    assert found[0].endswith("did you mean <http_port>?")
    assert found[3].startswith(f"{path}:9: block_size:")


@pytest.mark.timeout(20)
def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    entities = "\n".join(f'  <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    path = write(tmp_path, '<?xml version="1.0"?>\n<!DOCTYPE CONF [\n  <!ENTITY lol0 "lol">\n'
                 f'{entities}\n]>\n<CONF version="2"><server><state_dir>&lol9;</state_dir>'
                 "</server></CONF>\n")
    assert problems(path) == [
        f"{path}:3: entity declaration <!ENTITY lol0> refused: entities are not allowed "
        "(they enable expansion bombs and file/URL inclusion)"]


@pytest.mark.parametrize("decl", [
    '<!ENTITY xxe SYSTEM "file:///etc/passwd">',
    '<!ENTITY % xxe SYSTEM "file:///etc/passwd"> %xxe;',
])
def test_external_entity_is_refused(tmp_path: Path, decl: str) -> None:
    path = write(tmp_path, f'<?xml version="1.0"?>\n<!DOCTYPE CONF [\n{decl}\n]>\n'
                 '<CONF version="2"><server><state_dir>&xxe;</state_dir></server></CONF>\n')
    found = problems(path)
    assert len(found) == 1 and found[0].startswith(f"{path}:3: entity declaration <!ENTITY xxe>")


@pytest.mark.parametrize(("text", "kbps"), [
    ("0", 0), ("100", 100), ("500K", 500), ("100M", 100_000), ("1G", 1_000_000),
    ("1.5M", 1500), ("2.5g", 2_500_000), ("10Mbps", 10_000), ("1T", 1_000_000_000),
    ("400", 400), ("100", 100), ("1", 1),
])
def test_rates(tmp_path: Path, text: str, kbps: int) -> None:
    path = write(tmp_path, conf(f"<transfer><in><bandwidth><flow><target_rate>{text}"
                                "</target_rate></flow></bandwidth></in></transfer>\n"))
    assert load_config(path).flow_in.target_rate_kbps == kbps


def test_tiny_rate_does_not_become_unlimited(tmp_path: Path) -> None:
    path = write(tmp_path, conf("<transfer><out><bandwidth><flow><target_rate>100K"
                                "</target_rate><min_rate>0.2K</min_rate></flow></bandwidth>"
                                "</out></transfer>\n"))
    assert load_config(path).flow_out.min_rate_kbps == 1


@pytest.mark.parametrize("text", ["1.5", "-5", "5X", "M", "1 G b"])
def test_bad_rates(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, conf(f"<transfer><in><bandwidth><flow><min_rate>{text}"
                                "</min_rate></flow></bandwidth></in></transfer>\n"))
    assert problems(path)[0].endswith(f'min_rate: "{text}" is not a rate (use Kbps, or bits/s '
                                      "with a K/M/G suffix, e.g. 100M)")


@pytest.mark.parametrize(("text", "size"), [
    ("64K", 65536), ("4M", 4 << 20), ("64M", 64 << 20), ("1048576", 1 << 20), ("8 MiB", 8 << 20),
    ("256kb", 256 << 10), ("131072B", 131072),
])
def test_block_sizes(tmp_path: Path, text: str, size: int) -> None:
    path = write(tmp_path, conf(f"<file_system><block_size>{text}</block_size></file_system>\n"))
    assert load_config(path).block_size == size


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("TRUE", True), ("yes", True), ("1", True), ("On", True),
    ("false", False), ("No", False), ("0", False), ("off", False), ("\n  true\n  ", True),
])
def test_booleans(tmp_path: Path, text: str, value: bool) -> None:
    path = write(tmp_path, conf(f"<file_system><fsync>{text}</fsync></file_system>\n"))
    assert load_config(path).fsync is value


@pytest.mark.parametrize(("text", "value"), [
    ("127.0.0.1", "127.0.0.1"), ("::", "::"), ("[::1]", "::1"), ("localhost", "localhost"),
])
def test_bind_addresses(tmp_path: Path, text: str, value: str) -> None:
    path = write(tmp_path, conf(f"<http_server><bind_address>{text}</bind_address>"
                                "</http_server>\n"))
    assert load_config(path).bind_address == value


def test_relative_paths_resolve_against_config_directory(
    site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = write(site, conf("<server><state_dir>../elsewhere/state</state_dir></server>\n"))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    assert load_config(path).state_dir == site.parent / "elsewhere" / "state"


def test_relative_config_path_is_made_absolute(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(site, conf("<file_system><docroot>srv/shared</docroot></file_system>\n"))
    monkeypatch.chdir(site)
    config = load_config("aspera.conf")
    assert config.path == site / "aspera.conf"
    assert config.default_docroot == site / "srv" / "shared"
    assert config.sources["file_system.docroot"] == "aspera.conf:3"


def test_state_dir_that_is_a_file(site: Path) -> None:
    path = write(site, conf("<server><state_dir>tls/cert.pem</state_dir></server>\n"))
    assert problems(path) == [f"{path}:3: state_dir: {site / 'tls/cert.pem'} is not a directory"]


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    assert problems(Path(missing)) == [f"{missing}:0: cannot read: No such file or directory"]
    out, err = io.StringIO(), io.StringIO()
    assert validate_main(missing, out, err) == 2
    assert err.getvalue() == f"{missing}:0: cannot read: No such file or directory\n"
    assert out.getvalue() == ""


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert problems(tmp_path) == [f"{tmp_path}:0: cannot read: Is a directory"]


def test_validate_failure_prints_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, conf("""\
        <http_server>
          <http_port>80x</http_port>
          <enable_http>maybe</enable_http>
        </http_server>
        """))
    out, err = io.StringIO(), io.StringIO()
    assert validate_main(str(path), out, err) == 2
    assert out.getvalue() == ""
    assert err.getvalue() == (
        f'{path}:4: http_port: "80x" is not an integer\n'
        f'{path}:5: enable_http: "maybe" is not a boolean (use true/false, yes/no, 1/0)\n')


def test_embedded_defaults(tmp_path: Path) -> None:
    c = embedded_defaults(tmp_path, HASH)
    data = tmp_path / "fallback-data"
    assert c.path is None and c.state_dir == data and c.default_docroot == data / "docroot"
    assert (c.bind_address, c.enable_http, c.enable_https) == ("127.0.0.1", True, True)
    assert (c.http_port, c.https_port, c.shared_port) == (8080, 8443, False)
    assert c.users == (UserConfig("demo", HASH, data / "docroot", True, True),)
    assert set(c.sources.values()) == {"default"}
    assert embedded_defaults(tmp_path).users == ()


def test_sources_cover_exactly_the_printed_settings(site: Path) -> None:
    config = load_config(write(site, FULL.format(root=site, hash=HASH, bob_hash=BOB_HASH)))
    out = io.StringIO()
    validate_main(str(config.path), out, io.StringIO())
    printed = [line.split(" = ")[0] for line in out.getvalue().splitlines()]
    assert printed == list(config.sources)


def test_config_is_frozen_and_hashable(tmp_path: Path) -> None:
    a = embedded_defaults(tmp_path, HASH)
    b = embedded_defaults(tmp_path, HASH)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.http_port = 1  # type: ignore[misc]
    assert isinstance(a, Config)


def test_problem_and_error_formatting() -> None:
    p1, p2 = Problem("a.conf", 3, "one"), Problem("a.conf", 7, "two")
    assert str(p1) == "a.conf:3: one"
    error = ConfigError([p1, p2])
    assert error.problems == (p1, p2)
    assert str(error) == "a.conf:3: one\na.conf:7: two"
    clone = pickle.loads(pickle.dumps(error))
    assert clone.problems == error.problems and str(clone) == str(error)


# --------------------------------------------------------------------------- validate == serve
# If `config validate` says OK, `serve` starts: every value serve uses at start is tried the way
# serve uses it (addresses bound, ports bound, TLS pair loaded, state folder creatable).


def _validate(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = validate_main(str(path), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_bind_address_that_does_not_resolve_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, conf("<http_server><bind_address>not-an-ip</bind_address>"
                                "</http_server>\n"))
    rc, _, err = _validate(path)
    assert rc == 2
    assert err.splitlines() == [
        f'{path}:3: bind_address: "not-an-ip" does not resolve (Name or service not known): '
        "give an IP address of this host, or a host name that resolves to one"]


@pytest.mark.parametrize("element", ["bind_address", "bind_ip_address"])
def test_address_of_another_host_is_a_problem(tmp_path: Path, element: str) -> None:
    xml = ("<http_server><bind_address>192.0.2.10</bind_address></http_server>\n"
           if element == "bind_address" else
           "<transfer><protocol_options><bind_ip_address>192.0.2.10</bind_ip_address>"
           "</protocol_options></transfer>\n")
    path = write(tmp_path, conf(xml))
    assert problems(path) == [f'{path}:3: {element}: cannot listen on "192.0.2.10": Cannot '
                              "assign requested address (not an address of this host?)"]


def test_port_in_use_is_no_problem_of_the_file(tmp_path: Path) -> None:
    """The running daemon holds its own ports: validating its file (before a SIGHUP) must
    stay quiet about them; ``serve`` names a port it cannot bind when it starts."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path, conf(f"""\
            <http_server>
              <bind_address>127.0.0.1</bind_address>
              <enable_https>false</enable_https>
              <enable_http>true</enable_http>
              <http_port>{port}</http_port>
            </http_server>
            """))
        rc, _, err = _validate(path)
    assert (rc, err) == (0, "")


def test_port_needing_privileges_is_a_problem(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Faked: tests run as root, who may listen on port 80.
    import errno

    import fallback.config as config_module

    monkeypatch.setattr(config_module, "bind_error", lambda host, port, kind=0: PermissionError(
        errno.EACCES, "Permission denied") if port == 80 else None)
    path = write(tmp_path, conf("<http_server><https_port>80</https_port></http_server>\n"))
    assert problems(path) == [f"{path}:3: https_port: cannot listen on 0.0.0.0:80: Permission "
                              "denied (ports below 1024 need privileges)"]


@pytest.mark.parametrize("damage", ["not pem", "other key"])
def test_tls_pair_is_loaded_as_serve_loads_it(site: Path, damage: str) -> None:
    if damage == "not pem":
        (site / "tls" / "key.pem").write_text("key")
    else:  # a valid key that does not belong to the certificate
        ensure_self_signed(site / "other.pem", site / "other-key.pem")
        (site / "tls" / "key.pem").write_bytes((site / "other-key.pem").read_bytes())
    path = write(site, conf("""\
        <http_server><cert_file>tls/cert.pem</cert_file><key_file>tls/key.pem</key_file>
        </http_server>
        """))
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: cert_file: cannot use {site / 'tls' / 'cert.pem'} "
                              f"with key_file {site / 'tls' / 'key.pem'}: ")
    assert "\n" not in problem


def test_state_dir_that_cannot_be_created(site: Path) -> None:
    path = write(site, conf("<server><state_dir>tls/cert.pem/state</state_dir></server>\n"))
    assert problems(path) == [
        f"{path}:3: state_dir: cannot create {site / 'tls/cert.pem/state'} "
        f"({site / 'tls/cert.pem'} is not a writable folder): the generated TLS certificate "
        "is kept there"]


def test_damaged_generated_certificate(site: Path) -> None:
    (site / "state").mkdir()
    (site / "state" / "cert.pem").write_text("garbage")
    (site / "state" / "key.pem").write_text("garbage")
    path = write(site, conf("<server><state_dir>state</state_dir></server>\n"))
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: state_dir: the generated certificate "
                              f"{site / 'state' / 'cert.pem'} cannot be used (")
    assert problem.endswith("): remove cert.pem and key.pem there to generate a new pair")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user_conf(site: Path, password_hash: str) -> Path:
    # A free port: a daemon of another test on 8443 would add an "in use" warning.
    return write(site, conf(f"""\
        <http_server><https_port>{_free_port()}</https_port></http_server>
        <users>
          <user>
            <name>alice</name>
            <password_hash>{password_hash}</password_hash>
            <docroot>srv/alice</docroot>
          </user>
        </users>
        """))


def test_weak_argon2_hash_is_a_warning(site: Path) -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(memory_cost=8, time_cost=1, parallelism=1).hash("pw")
    _warns_once(site, weak, "weak password_hash: Argon2id m=8,t=1,p=1 is below the "
                "recommended minimum m=65536 KiB, t=3 (RFC 9106's second option, "
                "m=65536,t=3,p=4, is what `fallback hash-password` makes): make a new one with it")


def _warns_once(site: Path, password_hash: str, warning: str) -> None:
    """Validating a file whose user alice has ``password_hash``: exit 0, one warning."""
    path = _user_conf(site, password_hash)
    rc, _, err = _validate(path)
    assert rc == 0
    assert err.splitlines() == [f'{path}:7: warning: user "alice": {warning}']


def test_weak_scrypt_hash_is_a_warning(site: Path) -> None:
    rc, _, err = _validate(_user_conf(site, _scrypt("pw", ln=10)))
    assert rc == 0 and "warning: user \"alice\": weak password_hash: scrypt ln=10,r=8,p=1" in err


def test_hash_password_output_gets_no_warning(site: Path) -> None:
    for good in (HASH, BOB_HASH):
        rc, _, err = _validate(_user_conf(site, good))
        assert (rc, err) == (0, "")


def test_docs_example_hashes_are_reported_as_placeholders(site: Path) -> None:
    import re

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    hashes = re.findall(r"<password_hash>([^<]+)</password_hash>", doc)
    assert hashes
    for placeholder in hashes:
        _warns_once(site, placeholder, "password_hash is a placeholder, not a hash of a "
                    "password: nobody can log in with it; replace it with the output of "
                    "`fallback hash-password`")
