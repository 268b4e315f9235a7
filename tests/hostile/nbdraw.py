"""A tiny hand-rolled NBD client for the hostile-input tests.

libnbd refuses to send some malformed things (unknown command types, bad
magic, truncated payloads, unknown handshake flags). This module speaks the
fixed-newstyle protocol directly over a socket so the tests can send exactly
the bytes they want.

All integers are big-endian. Only the standard library is used.
"""

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Command flags.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply chunk types.
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
REPLY_FLAG_DONE = 1

# NBD error numbers (protocol values).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""


def parse_addr(addr):
    """`HOST:PORT` or `unix:/path` (the server's ready-line syntax)."""
    if addr.startswith("unix:"):
        return (socket.AF_UNIX, addr[len("unix:"):])
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (family, (host, int(port)))


def open_socket(addr, timeout=10.0):
    family, sockaddr = parse_addr(addr)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sockaddr)
    return s


def peer_closed(sock, timeout=5.0):
    """True if the peer closes the connection within `timeout` (EOF or
    reset), discarding anything it still sends; False if it stays open."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


class Reply:
    """One complete reply to a transmission request."""

    def __init__(self, cookie, error, data=b"", chunks=None):
        self.cookie = cookie
        self.error = error
        self.data = data
        self.chunks = chunks or []

    def __repr__(self):
        return "Reply(cookie=%#x, error=%d, %d data bytes, %d chunks)" % (
            self.cookie,
            self.error,
            len(self.data),
            len(self.chunks),
        )


class Client:
    """A raw NBD connection. Handshake steps are separate methods so tests can
    misbehave at any point."""

    def __init__(self, addr, timeout=10.0):
        self.sock = open_socket(addr, timeout)
        self.structured = False
        self.size = None
        self.tflags = None
        self.hflags = None
        self.no_zeroes = False

    # --- low level -----------------------------------------------------
    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError(
                    "server closed the connection (%d of %d bytes received)"
                    % (len(buf), n)
                )
            buf += chunk
        return bytes(buf)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def closed_by_peer(self, timeout=5.0):
        return peer_closed(self.sock, timeout)

    # --- handshake -----------------------------------------------------
    def read_greeting(self):
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise ProtocolError(
                "bad greeting %#x %#x (oldstyle or not NBD)" % (magic, ihaveopt)
            )
        self.hflags = hflags
        return hflags

    def send_client_flags(self, flags=None):
        if flags is None:
            flags = CLIENT_FIXED_NEWSTYLE
            if self.hflags is not None and self.hflags & FLAG_NO_ZEROES:
                flags |= CLIENT_NO_ZEROES
        self.no_zeroes = bool(flags & CLIENT_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def send_option(self, opt, data=b"", magic=IHAVEOPT):
        self.send(struct.pack(">QII", magic, opt, len(data)) + data)

    def read_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError("bad option reply magic %#x" % magic)
        data = self.recv_exact(length) if length else b""
        return opt, rtype, data

    def option(self, opt, data=b""):
        """Send one option and collect its replies up to the final one (ACK or
        an error). Returns [(rtype, data), ...]."""
        self.send_option(opt, data)
        replies = []
        while True:
            ropt, rtype, rdata = self.read_option_reply()
            if ropt != opt:
                raise ProtocolError(
                    "reply for option %d while waiting for %d" % (ropt, opt)
                )
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & (1 << 31):
                return replies

    def go(self, name=b"", structured=False):
        if structured:
            replies = self.option(OPT_STRUCTURED_REPLY)
            if replies[-1][0] != REP_ACK:
                raise ProtocolError("structured replies refused: %r" % replies)
            self.structured = True
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        replies = self.option(OPT_GO, data)
        if replies[-1][0] != REP_ACK:
            raise ProtocolError("OPT_GO refused: %r" % replies)
        for rtype, rdata in replies:
            if rtype == REP_INFO and len(rdata) >= 2:
                (itype,) = struct.unpack(">H", rdata[:2])
                if itype == INFO_EXPORT:
                    self.size, self.tflags = struct.unpack(">QH", rdata[2:12])
        if self.size is None:
            raise ProtocolError("OPT_GO sent no NBD_INFO_EXPORT")

    def handshake(self, structured=False):
        self.read_greeting()
        self.send_client_flags()
        self.go(structured=structured)
        return self

    # --- transmission --------------------------------------------------
    def request_header(self, cmd, offset, length, flags=0, cookie=1,
                       magic=REQUEST_MAGIC):
        return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)

    def request(self, cmd, offset, length, flags=0, cookie=1, payload=b""):
        self.send(self.request_header(cmd, offset, length, flags, cookie) + payload)

    def read_reply(self, read_length=0):
        """Read one complete reply. For a successful READ with simple replies
        the caller must say how many data bytes follow (`read_length`)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = b""
            if error == 0 and read_length:
                data = self.recv_exact(read_length)
            return Reply(cookie, error, data)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError("bad reply magic %#x" % magic)
        chunks = []
        error = 0
        data = bytearray()
        cookie = None
        while True:
            if chunks:
                (magic,) = struct.unpack(">I", self.recv_exact(4))
                if magic != STRUCTURED_REPLY_MAGIC:
                    raise ProtocolError("bad chunk magic %#x" % magic)
            flags, rtype, ck, length = struct.unpack(">HHQI", self.recv_exact(16))
            if cookie is not None and ck != cookie:
                raise ProtocolError("interleaved replies are not handled here")
            cookie = ck
            payload = self.recv_exact(length) if length else b""
            chunks.append((rtype, payload))
            if rtype & (1 << 15):
                (err,) = struct.unpack(">I", payload[:4])
                error = error or err
            elif rtype == REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            if flags & REPLY_FLAG_DONE:
                return Reply(cookie, error, bytes(data), chunks)

    def command(self, cmd, offset, length, flags=0, cookie=1, payload=b""):
        self.request(cmd, offset, length, flags, cookie, payload)
        rlen = length if cmd == CMD_READ else 0
        reply = self.read_reply(rlen)
        if reply.cookie != cookie:
            raise ProtocolError(
                "reply cookie %#x, expected %#x" % (reply.cookie, cookie)
            )
        return reply

    def disconnect(self):
        try:
            self.request(CMD_DISC, 0, 0, cookie=0xD15C)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close()
