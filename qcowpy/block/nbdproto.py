"""NBD wire constants and the fixed-size records of the protocol (doc/proto.md of NetworkBlockDevice/nbd).

Shared by the client driver (qcowpy.block.nbd) and the server above the block layer (qcowpy.export.nbd).
"""
from __future__ import annotations

import errno
import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

# NBD_OPT_INFO / GO information types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# base:allocation status bits
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"

# protocol errors (values fixed by the spec, not the host's errno numbering)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
_FROM_HOST = {errno.EPERM: EPERM, errno.EROFS: EPERM, errno.EACCES: EPERM, errno.EIO: EIO, errno.ENOMEM: ENOMEM,
              errno.EINVAL: EINVAL, errno.ENOSPC: ENOSPC, errno.EDQUOT: ENOSPC, errno.EFBIG: ENOSPC,
              errno.EOVERFLOW: EOVERFLOW, errno.ENOTSUP: ENOTSUP, errno.ESHUTDOWN: ESHUTDOWN}
_TO_HOST = {EPERM: errno.EPERM, EIO: errno.EIO, ENOMEM: errno.ENOMEM, EINVAL: errno.EINVAL, ENOSPC: errno.ENOSPC,
            EOVERFLOW: errno.EOVERFLOW, ENOTSUP: errno.ENOTSUP, ESHUTDOWN: errno.ESHUTDOWN}


def error_to_wire(host_errno: int | None) -> int:
    """A host errno as the protocol's error number (anything unlisted becomes EIO)."""
    return _FROM_HOST.get(host_errno or 0, EIO)


def error_from_wire(wire: int) -> int:
    """A protocol error number as the host's errno (unknown values become EIO, as the spec asks)."""
    return _TO_HOST.get(wire, errno.EIO)


MAX_STRING = 4096  # longest name, description or context query we accept
MAX_BUFFER = 32 << 20  # largest READ/WRITE payload, as qemu-nbd
MAX_OPTION = 64 << 10  # option payloads longer than this are refused (drained, ERR_TOO_BIG)

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
OFFSET = struct.Struct(">Q")
HOLE = struct.Struct(">QI")
ERROR = struct.Struct(">IH")
EXTENT = struct.Struct(">II")
EXPORT_INFO = struct.Struct(">HQH")  # INFO_EXPORT: type, size, transmission flags
BLOCK_SIZE_INFO = struct.Struct(">HIII")  # INFO_BLOCK_SIZE: type, minimum, preferred, maximum

COMMAND_NAMES = {CMD_READ: "NBD_CMD_READ", CMD_WRITE: "NBD_CMD_WRITE", CMD_DISC: "NBD_CMD_DISC",
                 CMD_FLUSH: "NBD_CMD_FLUSH", CMD_TRIM: "NBD_CMD_TRIM", CMD_CACHE: "NBD_CMD_CACHE",
                 CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES", CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS"}
