"""Where hosts push and viewers play: every RTMP and play URL is built here.

A node serves an application (``live``) over RTMP and HTTP.  A host's OBS gets
``rtmp://<host>[:port]/<app>`` as its server (the stream key goes in its own field); a room
plays from a *play base*: the node itself, ``http://<host>:<port>/<app>``, or, behind the CDN,
``https://<cdn>/<node-id>/<app>`` (one cache behaviour per node routes that path to its
origin).  Beside the base: ``<name>.flv`` (HTTP-FLV) and ``<name>/index.m3u8`` (LL-HLS).
"""

from __future__ import annotations

RTMP_DEFAULT_PORT = 1935


def url_host(host: str) -> str:
    """``host`` as a URL writes it: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def rtmp_url(host: str, port: int, app: str) -> str:
    """OBS's "Server": the port is left out when it is RTMP's own."""
    shown = "" if port == RTMP_DEFAULT_PORT else f":{port}"
    return f"rtmp://{url_host(host)}{shown}/{app}"


def node_play_base(host: str, http_port: int, app: str) -> str:
    return f"http://{url_host(host)}:{http_port}/{app}"


def cdn_play_base(cdn_domain: str, node_id: str, app: str) -> str:
    return f"https://{cdn_domain}/{node_id}/{app}"


def flv_url(play_base: str, name: str) -> str:
    return f"{play_base}/{name}.flv"


def hls_url(play_base: str, name: str) -> str:
    return f"{play_base}/{name}/index.m3u8"
