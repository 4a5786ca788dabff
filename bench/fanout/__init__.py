"""Side-by-side fan-out benchmark: WatchBuy's media node against node-media-server 4.4.3.

``python -m bench.fanout --help``; see bench/README.md and bench/RESULTS.md.
"""
