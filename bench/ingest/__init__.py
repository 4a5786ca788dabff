"""Ingest benchmark: concurrent ~600 kb/s RTMP publishers on one server core, WatchBuy against
node-media-server 4.4.3.  ``python -m bench.ingest --help``; see bench/README.md.
"""
