"""watchbuy.engine: the media node.

RTMP ingest, fan-out relay with a GOP cache, HTTP-FLV and RTMP playback, stream stats.  The
byte-level codecs (chunk stream, AMF, FLV muxing) are Cython extensions with pure-Python twins;
:mod:`watchbuy.engine.codecs` picks one.
"""
