# The E-RTMP v2 ModEx walk, shared by the compiled FLV and fMP4 codecs (included by both; the
# twins share _flvmux_py._skip_modex the same way).

cdef inline Py_ssize_t _skip_modex(
    const unsigned char* p, Py_ssize_t n, int* packet_type
) noexcept:
    """Position after the ModEx chain that may sit between a tag's first byte and its FourCC
    (updating ``packet_type`` to the real one), or -1 when truncated.  Each ModEx is: UI8 size-1
    (0xFF: a UI16 size-1 follows), the data, then modExType << 4 | next packet type."""
    cdef Py_ssize_t pos = 1
    cdef Py_ssize_t size
    while packet_type[0] == 7:  # PacketType.ModEx
        if pos >= n:
            return -1
        size = <Py_ssize_t>p[pos] + 1
        pos += 1
        if size == 256:
            if pos + 2 > n:
                return -1
            size = ((<Py_ssize_t>p[pos] << 8) | p[pos + 1]) + 1
            pos += 2
        pos += size
        if pos >= n:
            return -1
        packet_type[0] = p[pos] & 0x0F
        pos += 1
    return pos
