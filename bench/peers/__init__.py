"""Benchmark peers: servers (nginx, iperf3, the fallback daemon) and the clients that use them."""
