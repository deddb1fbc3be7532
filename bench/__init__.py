"""WAN benchmarks: user-space link emulator, peers (nginx, curl, aria2, iperf3, ours), runner."""
