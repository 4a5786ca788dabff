"""WatchBuy: live-stream shopping.

The subpackages live in top-level folders of the repository and install under this one name:
``watchbuy.engine`` (media node), ``watchbuy.site``, ``watchbuy.balancer``,
``watchbuy.status_agent`` and ``watchbuy.db``.
"""

__version__ = "0.1.0"
