"""Many idle TCP connections held open across a lab, for the chaos tests.

    python3 held_flows.py server PORT EXPECTED
    python3 held_flows.py client HOST PORT COUNT
    python3 held_flows.py probe HOST PORT
    python3 held_flows.py sniff PORT

The server accepts connections and keeps them, saying `accepted N` once
EXPECTED are open (each says `held` first; the server drops any other). The client opens COUNT connections to HOST:PORT, says
`connected N`, then echoes back whatever arrives on any of them. Either end
says `closed I REASON` as soon as one of its connections is reset or closed.

The prober measures how long new connections cannot be opened: on each
`go` line on its standard input it starts a new connection to HOST:PORT
every 10 ms (a SYN lost while the path is down is not waited for: the next
attempt is a fresh connection) until one completes, then prints the
milliseconds from `go` to that. Its connections say `probe` and close; the
server forgets them without counting them. On standard error it says when
the winning connection's SYN left, from which port, and the handshake's
round trip as the kernel measured it.

The sniffer prints `UNIX_NS INTERFACE DIR KIND SPORT DPORT` for every TCP
SYN and SYN-ACK to or from PORT on any interface of its namespace, those
inside VXLAN datagrams (UDP 4789) included: where a handshake waited.

On a `check` line on its standard input the server writes one line on every
connection and waits (up to 15 s) for each to come back; it then prints one
JSON object: `{"conns": N, "answered": A, "closed": C, "ms": T}`. The server
speaks first on purpose: if a firewall lost the connection, the server's
segment looks like a new flow from the server's side, which the policy
denies, so a lost connection cannot pass the check by being picked up again.
"""

import errno
import json
import os
import resource
import selectors
import socket
import sys
import time


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def say(*words):
    print(*words, flush=True)


def server(port, expected):
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    # fd -> [socket, held, bytes received]; a connection is held once it
    # said `held` (a prober's never does, and may vanish unnoticed).
    conns = {}
    closed = 0
    checking = None  # (token, deadline, started, answered fds)
    say("listening", port)

    def held():
        return [e for e in conns.values() if e[1]]

    while True:
        timeout = None
        if checking is not None:
            timeout = max(0.0, checking[1] - time.monotonic())
        for key, _ in sel.select(timeout):
            if key.data == "listen":
                while True:
                    try:
                        s, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    s.setblocking(False)
                    conns[s.fileno()] = [s, False, b""]
                    sel.register(s, selectors.EVENT_READ, "conn")
            elif key.data == "stdin":
                line = sys.stdin.readline()
                if not line:
                    return
                if line.strip() == "check":
                    token = b"check-%d\n" % time.monotonic_ns()
                    for s, _, _ in held():
                        try:
                            s.sendall(token)
                        except OSError:
                            pass
                    checking = (token, time.monotonic() + 15, time.monotonic(), set())
            else:
                s = key.fileobj
                entry = conns[s.fileno()]
                try:
                    data = s.recv(4096)
                except OSError as e:
                    data, why = None, errno.errorcode.get(e.errno, str(e))
                if not data:
                    if entry[1]:
                        closed += 1
                        say("closed", s.fileno(), "eof" if data == b"" else why)
                    sel.unregister(s)
                    del conns[s.fileno()]
                    s.close()
                    continue
                entry[2] += data
                if not entry[1]:
                    if entry[2].startswith(b"held\n"):
                        entry[1], entry[2] = True, entry[2][5:]
                        if len(held()) == expected:
                            say("accepted", expected)
                    elif len(entry[2]) >= 5:
                        # A prober's connection, or anything else: not held.
                        sel.unregister(s)
                        del conns[s.fileno()]
                        s.close()
                        continue
                if checking is not None and checking[0] in entry[2]:
                    checking[3].add(s.fileno())
                    entry[2] = b""
        if checking is not None and (
            len(checking[3]) == len(held()) or time.monotonic() >= checking[1]
        ):
            ms = int((time.monotonic() - checking[2]) * 1000)
            say(json.dumps({"conns": len(held()), "answered": len(checking[3]), "closed": closed, "ms": ms}))
            checking = None


def client(host, port, count):
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(count):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"held\n")
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, i)
    say("connected", len(socks))
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError as e:
                data, why = None, errno.errorcode.get(e.errno, str(e))
            if not data:
                say("closed", key.data, "eof" if data == b"" else why)
                sel.unregister(s)
                s.close()
                continue
            s.setblocking(True)
            s.sendall(data)
            s.setblocking(False)


def probe(host, port):
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        started = time.monotonic()
        sel = selectors.DefaultSelector()
        pending = []
        created = {}
        done = None
        next_try = started
        while done is None:
            now = time.monotonic()
            if now >= next_try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((host, port))
                sel.register(s, selectors.EVENT_WRITE)
                pending.append(s)
                created[s.fileno()] = now
                next_try = now + 0.01
            for key, _ in sel.select(max(0.0, next_try - time.monotonic())):
                s = key.fileobj
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done = time.monotonic()
                    # Where the time went (standard error, for the record): when
                    # the winning connection's SYN left, and the handshake's
                    # round trip as the kernel measured it (tcpi_rtt).
                    try:
                        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
                        rtt_us = int.from_bytes(info[68:72], "little")
                    except OSError:
                        rtt_us = -1
                    sys.stderr.write(
                        "probe: completed %.1f ms; its SYN left at %.1f ms from port %d, handshake rtt %.1f ms, %d attempts\n"
                        % ((done - started) * 1e3, (created[s.fileno()] - started) * 1e3, s.getsockname()[1], rtt_us / 1e3, len(pending))
                    )
                    sys.stderr.flush()
                    try:
                        s.sendall(b"probe\n")
                    except OSError:
                        done = None
                        sel.unregister(s)
                        continue
                    break
                sel.unregister(s)
            if done is None and now - started > 30:
                break
        for s in pending:
            s.close()
        sel.close()
        say(-1 if done is None else int((done - started) * 1000))


def sniff(port):
    """Print `UNIX_NS DIR FLAGS SPORT DPORT` for every TCP SYN or SYN-ACK
    to or from `port` on any interface of this namespace (DIR: in or out)."""
    ETH_P_ALL = 3
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    while True:
        frame, addr = s.recvfrom(65535)
        t = time.time_ns()
        if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        # A VXLAN datagram (UDP 4789): the frame inside it.
        if frame[14 + 9] == 17 and int.from_bytes(frame[14 + ihl + 2:14 + ihl + 4], "big") == 4789:
            frame = frame[14 + ihl + 8 + 8:]
            if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00":
                continue
            ihl = (frame[14] & 0x0F) * 4
        if frame[14 + 9] != 6:
            continue
        tcp = frame[14 + ihl:]
        sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
        flags = tcp[13]
        if port not in (sport, dport) or not flags & 0x02:
            continue
        what = "synack" if flags & 0x10 else "syn"
        say(t, addr[0], "out" if addr[2] == socket.PACKET_OUTGOING else "in", what, sport, dport)


def main():
    raise_fd_limit()
    if sys.argv[1] == "server":
        server(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "client":
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "sniff":
        sniff(int(sys.argv[2]))
    elif sys.argv[1] == "probe":
        probe(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: held_flows.py server PORT EXPECTED | client HOST PORT COUNT | probe HOST PORT | sniff PORT")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        os._exit(0)
