#!/usr/bin/env python3
"""Spike for agent-broker issue 14 (not project code). Run as root from the host netns.

"brokerd" = this process. It stays in the host netns; a short-lived thread enters each
workload netns (setns CLONE_NEWNET), makes the TCP + UDP listeners and a NETLINK_SOCK_DIAG
socket there, and goes back. Clients run inside the netns (nsenter) in a test cgroup where
redir.c's connect4/sockops programs redirect them."""
import ctypes, errno, os, socket, struct, subprocess, sys, threading, time, random, fcntl

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
SO_COOKIE, SO_NETNS_COOKIE = 57, 71
NS_GET_ID = 0x8008b70d  # _IOR(0xb7, 0xd, __u64), Linux 6.18 nsfs
PORT, DNS_PORT = 15001, 15053
tag = "%04x" % random.randrange(1 << 16)
NS = {n: f"abspike-{tag}-{n}" for n in "ab"}
CG = f"/sys/fs/cgroup/unified/abspike-{tag}"

def sh(cmd, check=True):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    print(f"$ {cmd}\n{(r.stdout + r.stderr).rstrip()}" if (r.stdout + r.stderr).strip() else f"$ {cmd}")
    if check and r.returncode: raise SystemExit(f"failed: {cmd}")
    return r.stdout

def setns(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))

def u64opt(s, opt):
    return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, opt, 8))[0]

def ns_id(path):
    buf = bytearray(8)
    try:
        fcntl.ioctl(os.open(path, os.O_RDONLY), NS_GET_ID, buf)
        return struct.unpack("Q", buf)[0]
    except OSError as e:
        return f"ioctl NS_GET_ID: {e}"

def thread_netns():
    return os.readlink("/proc/thread-self/ns/net")

def in_netns(path, fn):
    """Runs fn() on a fresh thread that enters the netns at `path`, then returns to its own."""
    out = {}
    def run():
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(path, os.O_RDONLY)
        try:
            setns(target)
            out["where"] = thread_netns()
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e
        finally:
            setns(own)  # back, so the thread could be reused
            out["back"] = thread_netns()
            os.close(own); os.close(target)
    t = threading.Thread(target=run); t.start(); t.join()
    if "error" in out: raise out["error"]
    return out

def open_listeners():
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", PORT)); tcp.listen(64)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", DNS_PORT))
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG
    spare = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # for the lifetime test
    return tcp, udp, diag, spare

def far_end(diag, near, far):
    """sock_diag exact lookup of the TCP socket whose own address is `far` and peer `near`."""
    sockid = struct.pack("!HH16s16s", far[1], near[1], socket.inet_aton(far[0]).ljust(16, b"\0"),
                         socket.inet_aton(near[0]).ljust(16, b"\0")) + struct.pack("=IQ", 0, 2**64 - 1)
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xffffffff) + sockid
    diag.send(struct.pack("=IHHII", 16 + len(req), 20, 1, 1, 0) + req)  # SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST
    data = diag.recv(65536)
    length, mtype = struct.unpack_from("=IH", data)
    if mtype == 2:  # NLMSG_ERROR
        return "error %s" % errno.errorcode.get(-struct.unpack_from("=i", data, 16)[0])
    state = data[17]; cookie = struct.unpack_from("=Q", data, 16 + 44)[0]
    return f"found: state {state}, cookie {cookie}"

CLIENT = r'''
import socket, struct, sys, os
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 40000))   # the same source address in both namespaces, on purpose
try:
    s.connect(("10.1.2.3", 443))  # redirected by connect4
except OSError as e:
    print(f"client {sys.argv[1]} connect(10.1.2.3:443): {e}"); sys.exit(0)
c = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]
n = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, 71, 8))[0]
s.sendall(f"hello from {sys.argv[1]}".encode())
print(f"client {sys.argv[1]}: pid {os.getpid()} netns {os.readlink('/proc/self/ns/net')} cookie {n}, "
      f"local {s.getsockname()}, peer {s.getpeername()}, SO_COOKIE {c}, reply {s.recv(100)!r}")
'''

def main():
    open("/tmp/abspike/client.py", "w").write(CLIENT)
    procs = []
    try:
        print("## host")
        host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        print(f"main thread netns {thread_netns()}, SO_NETNS_COOKIE {u64opt(host, SO_NETNS_COOKIE)}, "
              f"NS_GET_ID(/proc/self/ns/net) {ns_id('/proc/self/ns/net')}")
        for n in NS.values(): sh(f"ip netns add {n}")
        print("## lo is down in a fresh netns: can a listener bind 127.0.0.1 there?")
        try:
            in_netns(f"/run/netns/{NS['a']}", lambda: socket.socket().bind(("127.0.0.1", PORT)))
            print("bind with lo down: ok")
        except OSError as e:
            print(f"bind with lo down: {e}")
        def lo_down_connect():
            l = socket.socket(); l.bind(("127.0.0.1", PORT + 1)); l.listen(1)
            c = socket.socket(); c.settimeout(2)
            try:
                c.connect(("127.0.0.1", PORT + 1)); return "connected"
            except OSError as e:
                return str(e)
        print(f"connect to it with lo down: {in_netns(f'/run/netns/{NS[chr(97)]}', lo_down_connect)['value']}")
        for n in NS.values(): sh(f"ip -n {n} link set lo up")
        print("## listeners opened from a thread that enters each netns")
        state = {}
        for k, n in NS.items():
            r = in_netns(f"/run/netns/{n}", open_listeners)
            tcp, udp, diag, spare = r["value"]
            state[k] = r["value"]
            print(f"netns {k}: thread was in {r['where']}, back in {r['back']}; listener "
                  f"{tcp.getsockname()} SO_NETNS_COOKIE {u64opt(tcp, SO_NETNS_COOKIE)}, "
                  f"NS_GET_ID(/run/netns/{n}) {ns_id('/run/netns/' + n)}, udp {udp.getsockname()}")
        print(f"main thread still in {thread_netns()}; a socket it makes now has netns cookie "
              f"{u64opt(socket.socket(), SO_NETNS_COOKIE)}")
        os.mkdir(CG)
        cookie_a = u64opt(state["a"][0], SO_NETNS_COOKIE)
        print("## redirect programs on the test cgroup: only netns a has a listener entry")
        entries = [f"{cookie_a}:{PORT}"]
        if os.environ.get("BOTH"):
            entries.append(f"{u64opt(state['b'][0], SO_NETNS_COOKIE)}:{PORT}")
            print("(BOTH=1: netns b has an entry too)")
        loader = subprocess.Popen(["./redir", CG, *entries], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        procs.append(loader)
        assert loader.stdout.readline().strip() == "ready"
        clients = []
        for k, n in NS.items():
            cmd = (f"echo $$ > {CG}/cgroup.procs; exec nsenter --net=/run/netns/{n} "
                   f"python3 /tmp/abspike/client.py {k}")
            clients.append(subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, text=True))
        time.sleep(1.0)
        print("## brokerd side (main thread, host netns)")
        host_diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
        for k in NS:
            tcp, udp, diag, spare = state[k]
            tcp.settimeout(0.5)
            try:
                conn, peer = tcp.accept()
            except socket.timeout:
                print(f"netns {k}: nothing accepted"); continue
            local = conn.getsockname()
            print(f"netns {k}: accepted peer {peer} local {local}, accepted socket netns cookie "
                  f"{u64opt(conn, SO_NETNS_COOKIE)}; got {conn.recv(100)!r}")
            print(f"  sock_diag far_end via a netlink socket made in the host netns: {far_end(host_diag, local, peer)}")
            print(f"  sock_diag far_end via the netlink socket made in netns {k}:     {far_end(diag, local, peer)}")
            conn.sendall(b"reply from brokerd (host netns thread)")
            conn.close()
        for c in clients: print(c.communicate(timeout=5)[0].rstrip())
        loader.stdin.write("\n"); loader.stdin.flush()
        print(loader.communicate(timeout=5)[0].rstrip())
        print("## lifetime: delete netns a's name while brokerd still holds sockets in it")
        sh(f"ip netns del {NS['a']}")
        tcp, udp, diag, spare = state["a"]
        spare.settimeout(1)
        spare.connect(("127.0.0.1", PORT))
        conn, peer = tcp.accept()
        print(f"after `ip netns del`: a socket made in netns a earlier still connects to the listener "
              f"there (peer {peer}); netns cookie {u64opt(conn, SO_NETNS_COOKIE)}: brokerd's sockets keep "
              f"the namespace alive")
        conn.close()
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
        for n in NS.values(): subprocess.run(f"ip netns del {n} 2>/dev/null", shell=True)
        if os.path.isdir(CG):
            time.sleep(0.2); os.rmdir(CG)
        print(f"cleanup: remaining abspike netns: {sh('ip netns list | grep abspike || true', check=False)!r}")

main()
