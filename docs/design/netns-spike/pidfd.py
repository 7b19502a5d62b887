import ctypes, os, select, socket, struct, subprocess, threading, time, random
libc = ctypes.CDLL(None, use_errno=True)
ns = "abspike-%04x-p" % random.randrange(1 << 16)
subprocess.run(["ip", "netns", "add", ns], check=True)
try:
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "sleep", "2"])
    time.sleep(0.2)
    pidfd = libc.syscall(434, p.pid, 0)  # pidfd_open
    print(f"pidfd_open({p.pid}) = {pidfd}")
    out = {}
    def t():
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        out["setns(pidfd, CLONE_NEWNET)"] = libc.setns(pidfd, 0x40000000)
        s = socket.socket(); out["cookie of a socket made there"] = struct.unpack("Q", s.getsockopt(1, 71, 8))[0]
        libc.setns(own, 0x40000000)
    th = threading.Thread(target=t); th.start(); th.join()
    print(out, "| ip netns cookie via NS_GET_ID:", end=" ")
    import fcntl; b = bytearray(8); fcntl.ioctl(os.open(f"/run/netns/{ns}", os.O_RDONLY), 0x8008b70d, b); print(struct.unpack("Q", b)[0])
    t0 = time.time(); r = select.poll(); r.register(pidfd, select.POLLIN); r.poll(5000)
    print(f"pidfd readable (process exited) after {time.time()-t0:.1f}s")
finally:
    subprocess.run(["ip", "netns", "del", ns])
    print("remaining:", subprocess.run("ip netns list | grep abspike || true", shell=True, capture_output=True, text=True).stdout)
