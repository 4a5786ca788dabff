"""Site benchmark: room page req/s (wrk), chat fan-out latency, checkout throughput.

Run ``.venv/bin/python -m bench.site`` (``--quick`` for a ~30 s smoke run).
"""
