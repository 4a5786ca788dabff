"""The RTMP wire vocabulary: message types, chunk stream ids, user-control events.

Every Python module that speaks RTMP (the server sessions, the relay, the test/bench client and
the benchmarks' recorder) names these numbers from here, as asyncpg's ``consts.pxi`` does for
its protocol, so a newcomer finds them in one place and they cannot drift apart.  The chunk
codecs act on two of them (Set Chunk Size, Abort): the twin ``_chunk_py.py`` imports them from
here, and the compiled ``_chunk.pyx`` keeps C-level copies (``cdef enum``, for speed) that it
checks against this module when it is imported.

Numbers are from Adobe's RTMP specification (2012), sections 5.4 and 7.1; the chunk stream ids
for media are ffmpeg's and nginx-rtmp's choices, which players expect.
"""

from __future__ import annotations

from typing import Final

# -- message type ids (RTMP spec 5.4 protocol control, 7.1 command and media messages) ---------
MSG_SET_CHUNK_SIZE: Final = 1
MSG_ABORT: Final = 2
MSG_ACK: Final = 3
MSG_USER_CONTROL: Final = 4
MSG_WINDOW_ACK_SIZE: Final = 5
MSG_SET_PEER_BANDWIDTH: Final = 6
MSG_AUDIO: Final = 8
MSG_VIDEO: Final = 9
MSG_DATA_AMF3: Final = 15
MSG_SHARED_OBJECT_AMF3: Final = 16
MSG_COMMAND_AMF3: Final = 17
MSG_DATA_AMF0: Final = 18
MSG_SHARED_OBJECT_AMF0: Final = 19
MSG_COMMAND_AMF0: Final = 20
MSG_AGGREGATE: Final = 22

# -- user control events (type 4 payload: u16 event, then u32 value) ---------------------------
UC_STREAM_BEGIN: Final = 0
UC_STREAM_EOF: Final = 1
UC_STREAM_DRY: Final = 2
UC_SET_BUFFER_LENGTH: Final = 3
UC_STREAM_IS_RECORDED: Final = 4
UC_PING_REQUEST: Final = 6
UC_PING_RESPONSE: Final = 7

# -- chunk stream ids ---------------------------------------------------------------------------
CSID_CONTROL: Final = 2  # protocol control and user control: the spec fixes csid 2
CSID_COMMAND: Final = 3  # NetConnection commands
CSID_AUDIO: Final = 4  # media to players and from publishers (ffmpeg's and nginx-rtmp's choice)
CSID_DATA: Final = 5  # script data (onMetaData, |RtmpSampleAccess) and per-stream media
CSID_VIDEO: Final = 6
CSID_STATUS: Final = 8  # onStatus on a stream; kept apart from the shared media csids 4/5/6

# -- message stream ids -------------------------------------------------------------------------
PLAY_STREAM_ID: Final = 1  # the first createStream of every connection answers 1

# What an aggregate message may carry: the publisher's media and data, never another aggregate.
AGGREGATE_PARTS: Final = frozenset((MSG_AUDIO, MSG_VIDEO, MSG_DATA_AMF0, MSG_DATA_AMF3))
