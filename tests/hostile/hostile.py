"""Hostile-client scenarios against an NBD server, driven by tests/nbd_hostile.rs.

    hostile.py CASE --addr ADDR --uri URI [--pid PID] [--file PATH]

ADDR is the server's ready-line address (`HOST:PORT` or `unix:/path`), URI the
matching NBD URI for libnbd. Every case checks the server's answers against
tandem's intended behaviour, keeps going after a mismatch so one run reports
them all, prints one `FAIL:` line per mismatch and exits 1 if there was any.

Needs python3-libnbd (`import nbd`) for most cases; the raw-protocol ones use
nbdraw.py from this directory.
"""

import argparse
import errno
import os
import random
import signal
import socket
import struct
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdraw  # noqa: E402
from nbdraw import (  # noqa: E402
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
)

try:
    import nbd
except ImportError:  # pragma: no cover - reported clearly below
    nbd = None

MIB = 1024 * 1024
MAX_PAYLOAD = 32 * MIB
U64 = 1 << 64


def ename(e):
    if e is None:
        return "no errno"
    if e == 0:
        return "success"
    return "%s(%d)" % (errno.errorcode.get(e, "?"), e)


def pattern(length, seed):
    """Deterministic pseudo-random bytes, different per seed."""
    return random.Random(seed).randbytes(length)


class Checker:
    """Collects mismatches instead of stopping at the first one."""

    def __init__(self, case):
        self.case = case
        self.failures = []
        self.checks = 0

    def fail(self, what, expected, actual):
        line = "FAIL: [%s] %s: expected %s, got %s" % (self.case, what, expected, actual)
        print(line, flush=True)
        self.failures.append(line)

    def check(self, cond, what, expected, actual):
        self.checks += 1
        if not cond:
            self.fail(what, expected, actual)
        return cond

    def expect_errno(self, what, fn, expected):
        """fn() must raise nbd.Error with errnum == expected."""
        self.checks += 1
        try:
            fn()
        except nbd.Error as e:
            if e.errnum != expected:
                self.fail(what, ename(expected), "%s (%s)" % (ename(e.errnum), e.string))
                return False
            return True
        self.fail(what, ename(expected), "success")
        return False

    def expect_ok(self, what, fn):
        self.checks += 1
        try:
            return True, fn()
        except nbd.Error as e:
            self.fail(what, "success", "%s (%s)" % (ename(e.errnum), e.string))
        return False, None

    def raw_expect(self, what, reply, expected):
        self.checks += 1
        if reply.error != expected:
            self.fail(what, ename(expected), ename(reply.error))
            return False
        return True

    def finish(self):
        if self.failures:
            print(
                "%s: %d of %d checks failed" % (self.case, len(self.failures), self.checks),
                flush=True,
            )
            sys.exit(1)
        print("%s: all %d checks passed" % (self.case, self.checks), flush=True)


def connect(uri, structured=True, meta=True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta and structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def done(h):
    """Disconnect politely (libnbd handles have no close(); the handle is
    freed when garbage-collected)."""
    h.shutdown()


# Where this run's writes go that it reads back. Scenarios that run at once
# against one server get disjoint regions (`--region`), or one's write would
# land between another's write and its read-back.
REGION = 0
REGION_SIZE = 4 * MIB


def usable(ck, h, what, offset=0, seed=99):
    """The connection still serves a write + read round trip at `offset`
    within this run's region."""
    offset += REGION
    if h.is_read_only():
        ok, _ = ck.expect_ok("%s: then a READ on the same connection" % what, lambda: h.pread(4096, offset))
        return ok
    data = pattern(4096, seed)
    ok, _ = ck.expect_ok("%s: then a WRITE on the same connection" % what, lambda: h.pwrite(data, offset))
    if not ok:
        return False
    ok, got = ck.expect_ok("%s: then a READ on the same connection" % what, lambda: h.pread(4096, offset))
    return ok and ck.check(got == data, "%s: data read back on the same connection" % what, "what was written", "different bytes")


def raw_usable(ck, c, what, offset=8192, seed=7):
    """A raw connection still serves a write + read round trip at `offset`
    within this run's region."""
    offset += REGION
    data = pattern(4096, seed)
    try:
        r = c.command(CMD_WRITE, offset, len(data), cookie=0xAA01, payload=data)
        if not ck.raw_expect("%s: then a WRITE on the same connection" % what, r, 0):
            return False
        r = c.command(CMD_READ, offset, len(data), cookie=0xAA02)
        if not ck.raw_expect("%s: then a READ on the same connection" % what, r, 0):
            return False
        return ck.check(r.data == data, "%s: data read back" % what, "what was written", "different bytes")
    except (OSError, EOFError, nbdraw.ProtocolError) as e:
        ck.fail("%s: connection still usable" % what, "replies", repr(e))
        return False


# --------------------------------------------------------------------------
# healthy: a fresh client can read and write correctly.
# --------------------------------------------------------------------------
def case_healthy(args, ck):
    h = connect(args.uri)
    size = h.get_size()
    ro = h.is_read_only()
    # The first write is in this run's region; the other two are where no
    # scenario writes, so concurrent runs only ever read them back as written.
    for i, off in enumerate([REGION, size // 2 + 512, size - 65536]):
        if ro:
            ck.expect_ok("READ at %d" % off, lambda: h.pread(65536, off))
            continue
        data = pattern(65536, 1000 + i + int(time.time() * 1000) % 1000)
        ck.expect_ok("WRITE 64 KiB at %d" % off, lambda: h.pwrite(data, off))
        ok, got = ck.expect_ok("READ 64 KiB at %d" % off, lambda: h.pread(65536, off))
        if ok:
            ck.check(got == data, "data read back at %d" % off, "what was written", "different bytes")
    if not ro:
        ck.expect_ok("FLUSH", lambda: h.flush())
    done(h)


# --------------------------------------------------------------------------
# out-of-range requests, including offset+length overflowing u64.
# --------------------------------------------------------------------------
def out_of_range_ranges(size):
    return [
        ("starting at the end", size, 512),
        ("straddling the end", size - 512, 1024),
        ("one byte past the end", size - 4096, 4097),
        ("far past the end", size + 1024 * MIB, 4096),
        ("at offset 2^63", 1 << 63, 512),
        ("at offset 2^64-512 (offset+length = 2^64)", U64 - 512, 512),
        ("overflowing u64 (offset 2^64-512, length 1024)", U64 - 512, 1024),
        ("overflowing u64 (offset 2^64-1, length 4096)", U64 - 1, 4096),
    ]


def case_out_of_range(args, ck):
    for structured in (True, False):
        mode = "structured" if structured else "simple"
        h = connect(args.uri, structured=structured)
        size = h.get_size()
        if structured:
            ck.check(
                h.get_structured_replies_negotiated(),
                "structured replies negotiated", "yes", "no",
            )
        for desc, off, length in out_of_range_ranges(size):
            w = "%s replies, %s" % (mode, desc)
            ck.expect_errno("READ %s" % w, lambda: h.pread(length, off), errno.EINVAL)
            ck.expect_errno("WRITE %s" % w, lambda: h.pwrite(b"\xa5" * length, off), errno.ENOSPC)
            ck.expect_errno("TRIM %s" % w, lambda: h.trim(length, off), errno.EINVAL)
            ck.expect_errno("WRITE_ZEROES %s" % w, lambda: h.zero(length, off), errno.ENOSPC)
            ck.expect_errno("CACHE %s" % w, lambda: h.cache(length, off), errno.EINVAL)
            if structured:
                ck.expect_errno(
                    "BLOCK_STATUS %s" % w,
                    lambda: h.block_status(length, off, lambda *a: 0),
                    errno.EINVAL,
                )
            # Large TRIM/WRITE_ZEROES/CACHE lengths that run past the end.
            big = 0xFFFFFFFF
            ck.expect_errno("TRIM of 4 GiB-1 %s" % w, lambda: h.trim(big, off), errno.EINVAL)
            ck.expect_errno("WRITE_ZEROES of 4 GiB-1 %s" % w, lambda: h.zero(big, off), errno.ENOSPC)
            usable(ck, h, "after out-of-range requests %s" % w)
        # A long TRIM/WRITE_ZEROES from inside the export running off its end.
        ck.expect_errno("%s: TRIM from offset 0 of 4 GiB-1" % mode, lambda: h.trim(0xFFFFFFFF, 0), errno.EINVAL)
        ck.expect_errno("%s: WRITE_ZEROES from offset 0 of 4 GiB-1" % mode, lambda: h.zero(0xFFFFFFFF, 0), errno.ENOSPC)
        # The last byte of the export is in range.
        ck.expect_ok("%s: WRITE of the last 512 bytes" % mode, lambda: h.pwrite(b"\x5a" * 512, size - 512))
        ok, got = ck.expect_ok("%s: READ of the last 512 bytes" % mode, lambda: h.pread(512, size - 512))
        if ok:
            ck.check(got == b"\x5a" * 512, "%s: last 512 bytes read back" % mode, "0x5a bytes", "different bytes")
        done(h)

    # Raw client: the same over the wire, checking the reply errno and that
    # a failed READ sends no data after a simple error reply.
    for structured in (False, True):
        c = nbdraw.Client(args.addr).handshake(structured=structured)
        size = c.size
        mode = "raw %s" % ("structured" if structured else "simple")
        for desc, off, length in out_of_range_ranges(size):
            try:
                for cmd, name, exp in (
                    (CMD_READ, "READ", nbdraw.EINVAL),
                    (CMD_TRIM, "TRIM", nbdraw.EINVAL),
                    (CMD_WRITE_ZEROES, "WRITE_ZEROES", nbdraw.ENOSPC),
                    (CMD_CACHE, "CACHE", nbdraw.EINVAL),
                ):
                    r = c.command(cmd, off % U64, length, cookie=0x1000 + cmd)
                    ck.raw_expect("%s: %s %s" % (mode, name, desc), r, exp)
                r = c.command(CMD_WRITE, off, length, cookie=0x2001, payload=b"\x11" * length)
                ck.raw_expect("%s: WRITE %s" % (mode, desc), r, nbdraw.ENOSPC)
            except (OSError, EOFError, nbdraw.ProtocolError) as e:
                ck.fail("%s: requests %s" % (mode, desc), "error replies", repr(e))
                break
        raw_usable(ck, c, "%s after out-of-range requests" % mode)
        c.disconnect()


# --------------------------------------------------------------------------
# zero-length requests.
# --------------------------------------------------------------------------
def case_zero_length(args, ck):
    for structured in (True, False):
        mode = "structured" if structured else "simple"
        h = connect(args.uri, structured=structured)
        for off in (0, 4096, h.get_size() - 512):
            w = "%s replies, zero-length at offset %d" % (mode, off)
            ok, got = ck.expect_ok("READ %s" % w, lambda: h.pread(0, off))
            if ok:
                ck.check(got == b"", "READ %s returns no data" % w, "b''", repr(got[:16]))
            ck.expect_ok("WRITE %s" % w, lambda: h.pwrite(b"", off))
            ck.expect_ok("TRIM %s" % w, lambda: h.trim(0, off))
            ck.expect_ok("WRITE_ZEROES %s" % w, lambda: h.zero(0, off))
            ck.expect_ok("CACHE %s" % w, lambda: h.cache(0, off))
            if structured:
                ck.expect_errno(
                    "BLOCK_STATUS %s" % w,
                    lambda: h.block_status(0, off, lambda *a: 0),
                    errno.EINVAL,
                )
            usable(ck, h, "after zero-length requests (%s)" % w)
        done(h)

    # Raw: a zero-length WRITE carries no payload; the next request must be
    # parsed right after its header.
    c = nbdraw.Client(args.addr).handshake()
    try:
        for cmd, name in ((CMD_READ, "READ"), (CMD_WRITE, "WRITE"), (CMD_TRIM, "TRIM"),
                          (CMD_WRITE_ZEROES, "WRITE_ZEROES"), (CMD_CACHE, "CACHE")):
            r = c.command(cmd, 0, 0, cookie=0x3000 + cmd)
            ck.raw_expect("raw simple: zero-length %s" % name, r, 0)
        r = c.command(CMD_BLOCK_STATUS, 0, 0, cookie=0x3007)
        # Without negotiated block status any BLOCK_STATUS is invalid.
        ck.raw_expect("raw simple: zero-length BLOCK_STATUS", r, nbdraw.EINVAL)
    except (OSError, EOFError, nbdraw.ProtocolError) as e:
        ck.fail("raw simple: zero-length requests", "replies", repr(e))
    raw_usable(ck, c, "raw after zero-length requests")
    c.disconnect()


# --------------------------------------------------------------------------
# unknown commands and flags.
# --------------------------------------------------------------------------
def case_flags(args, ck):
    bit15 = 1 << 15
    for structured in (True, False):
        mode = "structured" if structured else "simple"
        h = connect(args.uri, structured=structured)
        bad = [
            ("READ with NO_HOLE", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)),
            ("READ with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)),
            ("READ with FAST_ZERO", lambda: h.pread(512, 0, nbd.CMD_FLAG_FAST_ZERO)),
            ("READ with flag bit 15", lambda: h.pread(512, 0, bit15)),
            ("WRITE with REQ_ONE", lambda: h.pwrite(b"\x01" * 512, 0, nbd.CMD_FLAG_REQ_ONE)),
            ("WRITE with NO_HOLE", lambda: h.pwrite(b"\x01" * 512, 0, nbd.CMD_FLAG_NO_HOLE)),
            ("WRITE with flag bit 15", lambda: h.pwrite(b"\x01" * 512, 0, bit15)),
            ("TRIM with flag bit 15", lambda: h.trim(512, 0, bit15)),
            ("WRITE_ZEROES with flag bit 15", lambda: h.zero(512, 0, bit15)),
            ("WRITE_ZEROES with REQ_ONE", lambda: h.zero(512, 0, nbd.CMD_FLAG_REQ_ONE)),
            ("FLUSH with flag bit 15", lambda: h.flush(bit15)),
            ("CACHE with flag bit 15", lambda: h.cache(512, 0, bit15)),
        ]
        if structured:
            bad.append(("BLOCK_STATUS with flag bit 15",
                        lambda: h.block_status(512, 0, lambda *a: 0, bit15)))
        for what, fn in bad:
            ck.expect_errno("%s replies: %s" % (mode, what), fn, errno.EINVAL)
            usable(ck, h, "%s replies: after %s" % (mode, what), seed=len(what))

        fua = nbd.CMD_FLAG_FUA
        good = [
            ("READ with FUA", lambda: h.pread(512, 0, fua)),
            ("WRITE with FUA", lambda: h.pwrite(b"\x02" * 512, 0, fua)),
            ("TRIM with FUA", lambda: h.trim(4096, 65536, fua)),
            ("WRITE_ZEROES with FUA", lambda: h.zero(4096, 65536, fua)),
            ("FLUSH with FUA", lambda: h.flush(fua)),
            ("CACHE with FUA", lambda: h.cache(4096, 0, fua)),
        ]
        if structured:
            good.append(("BLOCK_STATUS with FUA",
                         lambda: h.block_status(4096, 0, lambda *a: 0, fua)))
        for what, fn in good:
            ck.expect_ok("%s replies: %s" % (mode, what), fn)
        usable(ck, h, "%s replies: after FUA requests" % mode)
        done(h)

    # Unknown command types (libnbd cannot send these).
    for structured in (False, True):
        mode = "raw %s" % ("structured" if structured else "simple")
        c = nbdraw.Client(args.addr).handshake(structured=structured)
        try:
            for cmd in (8, 9, 12, 0x42, 0x7FFF, 0xFFFF):
                for length in (0, 512):
                    r = c.command(cmd, 0, length, cookie=0x4000 + cmd)
                    ck.raw_expect("%s: unknown command type %d, length %d" % (mode, cmd, length),
                                  r, nbdraw.EINVAL)
            # All command flag bits at once on a READ.
            r = c.command(CMD_READ, 0, 512, flags=0xFFFF, cookie=0x4100)
            ck.raw_expect("%s: READ with all 16 flag bits" % mode, r, nbdraw.EINVAL)
            r = c.command(CMD_FLUSH, 0, 0, flags=nbdraw.CMD_FLAG_FUA, cookie=0x4101)
            ck.raw_expect("%s: FLUSH with FUA" % mode, r, 0)
        except (OSError, EOFError, nbdraw.ProtocolError) as e:
            ck.fail("%s: unknown commands" % mode, "EINVAL replies", repr(e))
        raw_usable(ck, c, "%s after unknown commands" % mode)
        c.disconnect()


# --------------------------------------------------------------------------
# oversized payloads; huge TRIM / WRITE_ZEROES.
# --------------------------------------------------------------------------
def fake_requests(length):
    """Payload bytes that look like a stream of valid WRITE requests to offset
    0: a server that parsed the discarded payload as requests would corrupt
    the first sector."""
    hdr = struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, CMD_WRITE, 0xBAD, 0, 4) + b"EVIL"
    out = hdr * (length // len(hdr) + 1)
    return out[:length]


def case_oversized(args, ck):
    for structured in (False, True):
        mode = "raw %s" % ("structured" if structured else "simple")
        c = nbdraw.Client(args.addr, timeout=30).handshake(structured=structured)
        size = c.size
        try:
            first = pattern(4096, 5 + structured)
            r = c.command(CMD_WRITE, 0, 4096, cookie=0x5000, payload=first)
            ck.raw_expect("%s: WRITE before the oversized one" % mode, r, 0)

            for over in (MAX_PAYLOAD + 1, MAX_PAYLOAD + 4096, 48 * MIB):
                r = c.command(CMD_WRITE, 0, over, cookie=0x5001, payload=fake_requests(over))
                ck.raw_expect("%s: WRITE with a %d-byte payload" % (mode, over), r, nbdraw.EINVAL)
                r = c.command(CMD_READ, 0, 4096, cookie=0x5002)
                if ck.raw_expect("%s: READ after the oversized WRITE" % mode, r, 0):
                    ck.check(r.data == first,
                             "%s: first sector after a discarded %d-byte WRITE" % (mode, over),
                             "unchanged", "changed (payload was not discarded or was parsed)")
            # A payload of exactly 32 MiB is legal.
            data = pattern(MAX_PAYLOAD, 11)
            r = c.command(CMD_WRITE, MIB, MAX_PAYLOAD, cookie=0x5003, payload=data)
            ck.raw_expect("%s: WRITE of exactly 32 MiB" % mode, r, 0)
            r = c.command(CMD_READ, MIB, MAX_PAYLOAD, cookie=0x5004)
            if ck.raw_expect("%s: READ of exactly 32 MiB" % mode, r, 0):
                ck.check(r.data == data, "%s: 32 MiB read back" % mode, "what was written", "different bytes")
            for over in (MAX_PAYLOAD + 1, 64 * MIB, 0xFFFFFFFF):
                r = c.command(CMD_READ, 0, over, cookie=0x5005)
                ck.raw_expect("%s: READ of %d bytes" % (mode, over), r, nbdraw.EINVAL)
            # TRIM / WRITE_ZEROES longer than the payload limit but inside the
            # export: fine.
            r = c.command(CMD_WRITE_ZEROES, 0, size, cookie=0x5006)
            ck.raw_expect("%s: WRITE_ZEROES of the whole export (%d bytes)" % (mode, size), r, 0)
            r = c.command(CMD_READ, MIB, MIB, cookie=0x5007)
            if ck.raw_expect("%s: READ after WRITE_ZEROES" % mode, r, 0):
                ck.check(r.data == bytes(MIB), "%s: zeroes read back" % mode, "zeroes", "non-zero bytes")
            r = c.command(CMD_TRIM, 0, size, cookie=0x5008)
            ck.raw_expect("%s: TRIM of the whole export (%d bytes)" % (mode, size), r, 0)
            r = c.command(CMD_WRITE_ZEROES, 4096, size - 4096, flags=nbdraw.CMD_FLAG_NO_HOLE, cookie=0x5009)
            ck.raw_expect("%s: WRITE_ZEROES+NO_HOLE of %d bytes" % (mode, size - 4096), r, 0)
            r = c.command(CMD_CACHE, 0, size, cookie=0x500A)
            ck.raw_expect("%s: CACHE of the whole export" % mode, r, 0)
        except (OSError, EOFError, nbdraw.ProtocolError) as e:
            ck.fail("%s: oversized requests" % mode, "error replies on a live connection", repr(e))
        raw_usable(ck, c, "%s after oversized requests" % mode)
        c.disconnect()

    # libnbd: READ and WRITE of 33 MiB (libnbd allows up to 64 MiB).
    for structured in (True, False):
        mode = "structured" if structured else "simple"
        h = connect(args.uri, structured=structured)
        ck.expect_errno("libnbd %s: READ of 33 MiB" % mode, lambda: h.pread(33 * MIB, 0), errno.EINVAL)
        ck.expect_errno("libnbd %s: WRITE of 33 MiB" % mode,
                        lambda: h.pwrite(bytes(33 * MIB), 0), errno.EINVAL)
        usable(ck, h, "libnbd %s after 33 MiB requests" % mode)
        ck.expect_ok("libnbd %s: WRITE_ZEROES of 48 MiB" % mode, lambda: h.zero(48 * MIB, 0))
        ck.expect_ok("libnbd %s: TRIM of 48 MiB" % mode, lambda: h.trim(48 * MIB, 4096))
        done(h)


# --------------------------------------------------------------------------
# read-only export.
# --------------------------------------------------------------------------
def case_read_only(args, ck):
    for structured in (True, False):
        mode = "structured" if structured else "simple"
        h = connect(args.uri, structured=structured)
        ck.check(h.is_read_only(), "%s: export flags" % mode, "READ_ONLY advertised", "not read-only")
        ok, before = ck.expect_ok("%s: READ" % mode, lambda: h.pread(8192, 0))
        ck.expect_errno("%s: WRITE" % mode, lambda: h.pwrite(b"\xee" * 4096, 0), errno.EPERM)
        ck.expect_errno("%s: WRITE with FUA" % mode,
                        lambda: h.pwrite(b"\xee" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM)
        ck.expect_errno("%s: TRIM" % mode, lambda: h.trim(4096, 0), errno.EPERM)
        ck.expect_errno("%s: WRITE_ZEROES" % mode, lambda: h.zero(4096, 0), errno.EPERM)
        # FUA is accepted on every command, advertised or not.
        ck.expect_ok("%s: READ with FUA" % mode, lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA))
        ck.expect_ok("%s: FLUSH" % mode, lambda: h.flush())
        ok2, after = ck.expect_ok("%s: READ after refused writes" % mode, lambda: h.pread(8192, 0))
        if ok and ok2:
            ck.check(before == after, "%s: data after refused writes" % mode, "unchanged", "changed")
        done(h)
    c = nbdraw.Client(args.addr).handshake()
    try:
        before = c.command(CMD_READ, 0, 4096, cookie=1).data
        r = c.command(CMD_WRITE, 0, 4096, cookie=2, payload=b"\xee" * 4096)
        ck.raw_expect("raw: WRITE on a read-only export", r, nbdraw.EPERM)
        r = c.command(CMD_TRIM, 0, 4096, cookie=3)
        ck.raw_expect("raw: TRIM on a read-only export", r, nbdraw.EPERM)
        r = c.command(CMD_WRITE_ZEROES, 0, 4096, cookie=4)
        ck.raw_expect("raw: WRITE_ZEROES on a read-only export", r, nbdraw.EPERM)
        r = c.command(CMD_READ, 0, 4096, cookie=5)
        if ck.raw_expect("raw: READ after refused writes", r, 0):
            ck.check(r.data == before, "raw: data after refused writes", "unchanged", "changed")
    except (OSError, EOFError, nbdraw.ProtocolError) as e:
        ck.fail("raw: read-only export", "EPERM replies", repr(e))
    c.disconnect()


# --------------------------------------------------------------------------
# garbage and disconnects: the offending connection is closed, a bystander
# connected all along keeps being served.
# --------------------------------------------------------------------------
class Bystander:
    """A well-behaved libnbd client connected for the whole scenario."""

    def __init__(self, ck, uri):
        self.ck = ck
        self.h = connect(uri)
        self.n = 0
        self.step("before")

    def step(self, when):
        self.n += 1
        usable(self.ck, self.h, "bystander connection %s the hostile client" % when,
               offset=1 * MIB + 4096 * (self.n % 16), seed=1000 + self.n)

    def close(self):
        self.step("after")
        done(self.h)


def expect_closed(ck, c, what, timeout=5.0):
    closed = c.closed_by_peer(timeout)
    ck.check(closed, what, "server closes the connection", "still open after %.0fs" % timeout)
    c.close()


def case_bad_request_magic(args, ck):
    by = Bystander(ck, args.uri)
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        variants = [
            ("bad magic 0xdeadbeef", struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512)),
            ("reply magic as request magic",
             struct.pack(">IHHQQI", nbdraw.SIMPLE_REPLY_MAGIC, 0, CMD_READ, 1, 0, 512)),
            ("byte-swapped request magic",
             struct.pack("<IHHQQI", nbdraw.REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)),
            ("an HTTP request", b"GET / HTTP/1.1\r\nHost: example.invalid\r\nAccept: */*\r\n\r\n"),
            ("random bytes", pattern(4096, 77)),
        ]
        for what, junk in variants:
            c = nbdraw.Client(args.addr).handshake(structured=structured)
            try:
                # A good request first, then garbage.
                r = c.command(CMD_READ, 0, 512, cookie=0x600)
                ck.raw_expect("%s: READ before garbage" % mode, r, 0)
                c.send(junk)
            except (OSError, EOFError, nbdraw.ProtocolError) as e:
                ck.fail("%s: sending %s" % (mode, what), "accepted bytes", repr(e))
            expect_closed(ck, c, "%s: request with %s" % (mode, what))
            by.step("after %s (%s)" % (what, mode))
        # Garbage in the middle of a pipeline: the earlier good requests are
        # still answered or the connection is closed; never a wrong answer.
        c = nbdraw.Client(args.addr).handshake(structured=structured)
        good = c.request_header(CMD_READ, 0, 512, cookie=0x700)
        try:
            c.send(good + struct.pack(">IHHQQI", 0x12345678, 0, CMD_WRITE, 0x701, 0, 512) + b"\xff" * 512)
        except OSError as e:
            ck.fail("%s: pipelined garbage" % mode, "accepted bytes", repr(e))
        try:
            r = c.read_reply(512)
            ck.check(r.cookie == 0x700 and r.error == 0,
                     "%s: reply to the good request before garbage" % mode,
                     "cookie 0x700, success", repr(r))
        except (OSError, EOFError):
            pass  # closing at once is also fine
        expect_closed(ck, c, "%s: garbage after a good request" % mode)
        by.step("after pipelined garbage (%s)" % mode)
    by.close()


def case_bad_handshake(args, ck):
    by = Bystander(ck, args.uri)

    # Bad IHAVEOPT magic in an option request.
    c = nbdraw.Client(args.addr)
    c.read_greeting()
    c.send_client_flags()
    c.send_option(nbdraw.OPT_GO, struct.pack(">IH", 0, 0), magic=0x1122334455667788)
    expect_closed(ck, c, "option request with bad magic")
    by.step("after an option with bad magic")

    # Bad magic after a successful first option.
    c = nbdraw.Client(args.addr)
    c.read_greeting()
    c.send_client_flags()
    replies = c.option(nbdraw.OPT_LIST)
    ck.check(replies[-1][0] == nbdraw.REP_ACK, "OPT_LIST", "ACK", repr(replies[-1][0]))
    c.send(b"\x00" * 16 + b"garbage garbage garbage")
    expect_closed(ck, c, "garbage after OPT_LIST")
    by.step("after garbage after OPT_LIST")

    # Immediate garbage instead of client flags + options (an HTTP client).
    c = nbdraw.Client(args.addr)
    c.read_greeting()
    c.send(b"GET / HTTP/1.0\r\n\r\n" + pattern(1000, 3))
    expect_closed(ck, c, "HTTP request instead of a handshake")
    by.step("after an HTTP request")

    # Oldstyle-ish / truncated handshakes: flags then hang up; half an option
    # header then hang up; an option announcing a huge length then hang up.
    for what, data in (
        ("client flags then hang-up", struct.pack(">I", 1)),
        ("half an option header", struct.pack(">I", 1) + struct.pack(">Q", nbdraw.IHAVEOPT)[:5]),
        ("option announcing 4 GiB of data", struct.pack(">I", 1)
         + struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 0xFFFFFFFF) + b"x" * 100),
        ("OPT_GO with a name longer than its data", struct.pack(">I", 1)
         + struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 6) + struct.pack(">IH", 1000, 0)),
    ):
        c = nbdraw.Client(args.addr)
        c.read_greeting()
        try:
            c.send(data)
        except OSError:
            pass
        if what.startswith("OPT_GO with"):
            # A malformed option may be answered with an error (and the
            # session goes on) or closed; both are fine, silence is not.
            try:
                opt, rtype, _ = c.read_option_reply()
                ck.check(rtype & (1 << 31), "malformed OPT_GO", "an error reply", "reply type %#x" % rtype)
            except (OSError, EOFError, nbdraw.ProtocolError):
                pass
        c.close()
        by.step("after %s" % what)

    # Connect and say nothing, then connect and hang up at once.
    c = nbdraw.Client(args.addr)
    c.close()
    s = nbdraw.open_socket(args.addr)
    s.close()
    by.step("after clients that hung up during the greeting")
    by.close()


def case_mid_payload(args, ck):
    by = Bystander(ck, args.uri)
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        scenarios = [
            ("WRITE of 1 MiB, 1000 payload bytes sent", 1 * MIB, 1000, False),
            ("WRITE of 32 MiB, 5 MiB payload sent", MAX_PAYLOAD, 5 * MIB, False),
            ("WRITE of 64 KiB, no payload", 65536, 0, False),
            ("WRITE of 1 MiB, half sent, then half-close", 1 * MIB, MIB // 2, True),
            ("oversized WRITE of 40 MiB, 1 MiB sent", 40 * MIB, MIB, False),
        ]
        for what, length, sent, half_close in scenarios:
            c = nbdraw.Client(args.addr, timeout=30).handshake(structured=structured)
            marker = pattern(4096, 31 + sent)
            at = REGION + 2 * MIB
            try:
                r = c.command(CMD_WRITE, at, 4096, cookie=0x800, payload=marker)
                ck.raw_expect("%s: WRITE before %s" % (mode, what), r, 0)
                c.send(c.request_header(CMD_WRITE, at, length, cookie=0x801) + b"\x66" * sent)
                if half_close:
                    c.sock.shutdown(socket.SHUT_WR)
                    expect_closed(ck, c, "%s: %s" % (mode, what))
                else:
                    c.close()
            except OSError as e:
                ck.fail("%s: %s" % (mode, what), "bytes accepted", repr(e))
                c.close()
            by.step("after %s (%s)" % (what, mode))
            # The truncated write was not applied.
            h = connect(args.uri)
            ok, got = ck.expect_ok("%s: READ after %s" % (mode, what), lambda: h.pread(4096, at))
            if ok:
                ck.check(got == marker, "%s: data after %s" % (mode, what),
                         "the earlier complete WRITE", "changed by the truncated WRITE")
            done(h)
        # Half a request header.
        c = nbdraw.Client(args.addr).handshake(structured=structured)
        c.send(c.request_header(CMD_READ, 0, 512, cookie=0x900)[:13])
        c.close()
        by.step("after half a request header (%s)" % mode)
        # Many pipelined reads, then hang up without reading the replies.
        c = nbdraw.Client(args.addr).handshake(structured=structured)
        try:
            c.send(b"".join(c.request_header(CMD_READ, (i % 64) * MIB, 1 * MIB, cookie=0xA00 + i)
                            for i in range(64)))
        except OSError:
            pass
        time.sleep(0.05)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST with unread replies in flight
        by.step("after a client reset with 64 MiB of replies pending (%s)" % mode)
    by.close()


# --------------------------------------------------------------------------
# handshake: unknown options and client flags.
# --------------------------------------------------------------------------
def case_handshake_options(args, ck):
    by = Bystander(ck, args.uri)
    c = nbdraw.Client(args.addr)
    hflags = c.read_greeting()
    ck.check(hflags & nbdraw.FLAG_FIXED_NEWSTYLE, "greeting", "FIXED_NEWSTYLE", "flags %#x" % hflags)
    c.send_client_flags()
    for opt, data in ((0x7654321, b""), (0x7654321, b"some option data"),
                      (0xFFFFFFFF, pattern(300, 2)), (100, b"")):
        try:
            replies = c.option(opt, data)
            ck.check(len(replies) == 1 and replies[0][0] == nbdraw.REP_ERR_UNSUP,
                     "unknown option %#x (%d data bytes)" % (opt, len(data)),
                     "one NBD_REP_ERR_UNSUP", repr([(hex(t), d[:32]) for t, d in replies]))
        except (OSError, EOFError, nbdraw.ProtocolError) as e:
            ck.fail("unknown option %#x" % opt, "NBD_REP_ERR_UNSUP", repr(e))
            return
    # The session continues: list, then go, then transmission.
    try:
        replies = c.option(nbdraw.OPT_LIST)
        ck.check(replies[-1][0] == nbdraw.REP_ACK and all(t == nbdraw.REP_SERVER for t, _ in replies[:-1]),
                 "OPT_LIST after unknown options", "REP_SERVER... REP_ACK", repr(replies))
        c.go(structured=True)
        raw_usable(ck, c, "transmission after unknown options")
    except (OSError, EOFError, nbdraw.ProtocolError) as e:
        ck.fail("session after unknown options", "OPT_LIST and OPT_GO succeed", repr(e))
    c.disconnect()
    by.step("after unknown options")

    # OPT_ABORT ends the session politely.
    c = nbdraw.Client(args.addr)
    c.read_greeting()
    c.send_client_flags()
    c.send_option(nbdraw.OPT_ABORT)
    try:
        opt, rtype, _ = c.read_option_reply()
        ck.check(opt == nbdraw.OPT_ABORT and rtype == nbdraw.REP_ACK, "OPT_ABORT", "ACK", "type %#x" % rtype)
    except (OSError, EOFError):
        pass  # the spec lets the server just close
    expect_closed(ck, c, "after OPT_ABORT")

    # Unknown client flags: the server must close without negotiating.
    for flags in (1 << 31, nbdraw.CLIENT_FIXED_NEWSTYLE | (1 << 5), 0xFFFFFFFF):
        c = nbdraw.Client(args.addr)
        c.read_greeting()
        c.send_client_flags(flags)
        got_reply = False
        try:
            c.send_option(nbdraw.OPT_LIST)
            c.read_option_reply()
            got_reply = True
        except (OSError, EOFError, nbdraw.ProtocolError):
            pass
        ck.check(not got_reply, "client flags %#x: OPT_LIST" % flags, "no reply (connection closed)", "a reply")
        expect_closed(ck, c, "client flags %#x" % flags)
        by.step("after client flags %#x" % flags)
    by.close()


# --------------------------------------------------------------------------
# graceful shutdown.
# --------------------------------------------------------------------------
CLOSED_ERRNOS = {None, 0, errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE}


def case_shutdown(args, ck):
    if not args.pid or not args.file:
        print("shutdown needs --pid and --file", file=sys.stderr)
        sys.exit(2)
    idle = connect(args.uri)
    busy = connect(args.uri)
    size = busy.get_size()
    n, chunk = 32, 1 * MIB
    datas = [pattern(chunk, 500 + i) for i in range(n)]
    cookies = []

    def submit(i):
        flags = nbd.CMD_FLAG_FUA if i % 3 == 0 else 0
        cookies.append(busy.aio_pwrite(datas[i], 4 * MIB + i * chunk, None, flags))

    # Some writes reach the server, SIGTERM arrives while they are in flight,
    # and more are sent while the server is starting to shut down.
    for i in range(n // 2):
        submit(i)
    busy.poll(0)
    os.kill(args.pid, signal.SIGTERM)
    for i in range(n // 2, n):
        submit(i)
    t0 = time.monotonic()
    results = {}
    dead = False
    while len(results) < n and time.monotonic() - t0 < 10:
        for i, cookie in enumerate(cookies):
            if i in results:
                continue
            try:
                if busy.aio_command_completed(cookie):
                    results[i] = 0
            except nbd.Error as e:
                results[i] = e.errnum
        if dead:
            break
        if len(results) < n:
            try:
                busy.poll(100)
            except nbd.Error:
                dead = True  # collect the failed commands once more
    pending = n - len(results)
    ck.check(pending == 0, "writes in flight at SIGTERM", "all answered", "%d never answered" % pending)
    succeeded = [i for i, e in results.items() if e == 0]
    for i, e in sorted(results.items()):
        if i < n // 2:
            # Sent before SIGTERM: completed, or refused if the server had
            # not read it yet; never dropped or failed otherwise.
            ck.check(e in (0, errno.ESHUTDOWN), "WRITE #%d sent before SIGTERM" % i,
                     "success or ESHUTDOWN", ename(e))
        else:
            ck.check(e in CLOSED_ERRNOS, "WRITE #%d sent just after SIGTERM" % i,
                     "success, ESHUTDOWN or a closed connection", ename(e))
    print("shutdown: %d of %d in-flight writes completed, %d got ESHUTDOWN"
          % (len(succeeded), n, sum(1 for e in results.values() if e == errno.ESHUTDOWN)), flush=True)

    # Requests issued after shutdown began: ESHUTDOWN or a closed connection.
    time.sleep(0.1)
    for name, h in (("idle", idle), ("busy", busy)):
        for what, fn in (("READ", lambda: h.pread(4096, 0)),
                         ("WRITE", lambda: h.pwrite(b"\x77" * 4096, size - 4096))):
            try:
                fn()
                ck.fail("%s client: %s after SIGTERM" % (name, what), "ESHUTDOWN or closed", "success")
            except nbd.Error as e:
                # Once the server has closed the connection libnbd fails
                # further calls on the dead handle with EINVAL ("invalid
                # state"): that is a closed connection too.
                closed = e.errnum in CLOSED_ERRNOS or h.aio_is_closed() or h.aio_is_dead()
                ck.check(closed, "%s client: %s after SIGTERM" % (name, what),
                         "ESHUTDOWN or a closed connection", "%s (%s)" % (ename(e.errnum), e.string))
                print("shutdown: %s client %s after SIGTERM -> %s" % (name, what, ename(e.errnum)), flush=True)
    # New clients are no longer accepted (the listener is gone) - or, if the
    # connect races the close, they cannot complete a session.
    try:
        late = connect(args.uri)
        try:
            late.pread(512, 0)
            ck.fail("new client after SIGTERM", "refused or ESHUTDOWN", "served a READ")
        except nbd.Error:
            pass
    except nbd.Error:
        pass
    for h in (idle, busy):
        try:
            h.shutdown()
        except nbd.Error:
            pass
    del idle, busy, h

    # Wait for the process to exit, then check the acknowledged writes.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            break
        if os.path.exists("/proc/%d" % args.pid):
            with open("/proc/%d/stat" % args.pid) as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break  # exited; the test harness reaps it
        time.sleep(0.02)
    else:
        ck.fail("server process after SIGTERM", "exits within 5 s", "still running")
    with open(args.file, "rb") as f:
        for i in succeeded:
            f.seek(4 * MIB + i * chunk)
            ck.check(f.read(chunk) == datas[i], "acknowledged WRITE #%d in the backing file" % i,
                     "its data", "different bytes")


CASES = {
    "healthy": case_healthy,
    "out-of-range": case_out_of_range,
    "zero-length": case_zero_length,
    "flags": case_flags,
    "oversized": case_oversized,
    "read-only": case_read_only,
    "bad-request-magic": case_bad_request_magic,
    "bad-handshake": case_bad_handshake,
    "mid-payload": case_mid_payload,
    "handshake-options": case_handshake_options,
    "shutdown": case_shutdown,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--addr", required=True)
    p.add_argument("--uri", required=True)
    p.add_argument("--pid", type=int)
    p.add_argument("--file")
    p.add_argument("--region", type=int, default=0,
                   help="index of the %d MiB region this run writes to (for runs at once)" % (REGION_SIZE // MIB))
    args = p.parse_args()
    global REGION
    REGION = args.region * REGION_SIZE
    if nbd is None:
        print("FAIL: python3-libnbd is not importable by %s" % sys.executable, flush=True)
        sys.exit(3)
    ck = Checker(args.case)
    try:
        CASES[args.case](args, ck)
    except Exception:  # an unexpected error is a failure with a traceback
        ck.fail("scenario ran to the end", "no exception", traceback.format_exc())
    ck.finish()


if __name__ == "__main__":
    main()
