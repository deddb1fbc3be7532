"""Rate caps on the HTTP path (issue 11 section 5): ``--target-rate`` and the server's flows.

One token bucket per session and direction (``transport.blocks.pacing.Pacer``)
paces every HTTP stream: the client's own cap for its uploads, the daemon's
for what it sends (downloads) and for what it reads (uploads: TCP's window
then holds the client to it). The server's ``<transfer><in|out><bandwidth>
<flow>`` wins over what the client asks. Real daemons, real transfers, timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fallback.config import FlowConfig
from fallback.control import Flow
from fallback.engine import Options
from fallback.errors import UsageError
from fallback.sessions import effective_flow
from tests.conftest import Daemon, make_file, sha256

SIZE = 2 << 20  # 16.8 Mbit: about 2 s at 8 Mbit/s
BS = ("--block-size", "256K")
SLOW = 1.4  # seconds at least at 8 Mbit/s: the burst (256 KiB) and one block leave at once
FAST = 8 * SIZE / (SIZE - (512 << 10)) * 1.1  # Mbit/s at most, counting them


def flows(way: str, kbps: int) -> str:
    return (f"<transfer><{way}><bandwidth><flow><target_rate>{kbps}</target_rate>"
            f"</flow></bandwidth></{way}></transfer>"
            "<file_system><block_size>256K</block_size></file_system>")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_file(tmp_path / "r.bin", SIZE, seed=12)


def test_target_rate_caps_an_http_upload(daemon: Daemon, src: Path) -> None:
    rc, res, err = daemon.transfer(str(src), daemon.url("/up.bin"), *BS, "--target-rate", "8M")
    assert rc == 0 and res["ok"], err
    assert res["seconds"] >= SLOW and res["rate_mbps"] <= FAST, res
    assert sha256(daemon.docroots["alice"] / "up.bin") == sha256(src)
    rc, res, _ = daemon.transfer(str(src), daemon.url("/fast.bin"), *BS)  # and uncapped
    assert res["ok"] and res["seconds"] < SLOW


def test_the_servers_download_cap_wins_over_the_clients(daemon_factory, src: Path,
                                                        tmp_path: Path) -> None:
    d = daemon_factory(flows("out", 8000))  # 8 Mbit/s out of the server
    (d.docroots["alice"] / "r.bin").write_bytes(src.read_bytes())
    rc, res, err = d.transfer(d.url("/r.bin"), str(tmp_path / "back.bin"), "--target-rate", "1G")
    assert rc == 0 and res["ok"], err
    assert res["seconds"] >= SLOW and res["rate_mbps"] <= FAST, res
    assert sha256(tmp_path / "back.bin") == sha256(src)
    rc, res, _ = d.transfer(str(src), d.url("/in.bin"), *BS)  # uploads are not capped by <out>
    assert res["ok"] and res["seconds"] < SLOW


def test_the_servers_upload_cap_holds_a_client_that_asks_nothing(daemon_factory,
                                                                 src: Path) -> None:
    d = daemon_factory(flows("in", 8000))
    rc, res, err = d.transfer(str(src), d.url("/in.bin"), *BS)
    assert rc == 0 and res["ok"], err
    assert res["seconds"] >= SLOW, res  # the daemon read no faster than its cap
    assert sha256(d.docroots["alice"] / "in.bin") == sha256(src)


@pytest.mark.parametrize("args,message", [
    (("--target-rate", "fast"), "--target-rate: bad rate 'fast'"),
    (("--target-rate", "1M", "--min-rate", "2M"), "--min-rate must not exceed --target-rate"),
    (("--target-rate", "0.0001"), "--target-rate must be a positive rate"),
])
def test_bad_rates_are_usage_errors(daemon: Daemon, src: Path, args: tuple[str, ...],
                                    message: str) -> None:
    rc, _, err = daemon.transfer(str(src), daemon.url("/x.bin"), *args, check=False)
    assert rc == 2 and message in err, err


def test_rates_in_options() -> None:
    assert Options(target_rate="20M").target_bps == 20_000_000
    assert Options(target_rate=5e6).flow() == Flow(5_000_000, 0, "fair")
    assert Options().flow() is None
    with pytest.raises(UsageError, match="^policy must be one of"):  # the API names keywords
        Options(policy="greedy").check()


def test_the_server_flow_wins() -> None:
    server = FlowConfig(target_rate_kbps=10_000, min_rate_kbps=0, policy="fair")
    assert effective_flow(server, Flow(50_000_000, 0, "high")) == Flow(10_000_000, 0, "high")
    assert effective_flow(server, Flow(1_000_000, 0, "fair")) == Flow(1_000_000, 0, "fair")
    assert effective_flow(server, None) == Flow(10_000_000, 0, "fair")
    low = FlowConfig(target_rate_kbps=0, min_rate_kbps=2000, policy="low")
    assert effective_flow(low, Flow(1_000_000, 0, "fixed")) == Flow(1_000_000, 1_000_000, "low")
    assert effective_flow(FlowConfig(0, 0, "fair"), None) == Flow(0, 0, "fair")
