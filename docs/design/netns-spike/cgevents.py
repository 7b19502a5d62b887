import ctypes, os, struct, subprocess, time, random, select
libc = ctypes.CDLL(None, use_errno=True)
cg = "/sys/fs/cgroup/unified/abspike-%04x" % random.randrange(1 << 16)
os.mkdir(cg)
try:
    p = subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs; exec sleep 1"])
    time.sleep(0.3)
    print("cgroup.events while running:", open(f"{cg}/cgroup.events").read().split())
    fd = libc.inotify_init1(0)
    wd = libc.inotify_add_watch(fd, f"{cg}/cgroup.events".encode(), 0x2)  # IN_MODIFY
    t0 = time.time()
    select.select([fd], [], [], 5)
    print(f"inotify IN_MODIFY on cgroup.events after {time.time()-t0:.2f}s:", open(f"{cg}/cgroup.events").read().split())
    p.wait()
finally:
    time.sleep(0.1); os.rmdir(cg)
