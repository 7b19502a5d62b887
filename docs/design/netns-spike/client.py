
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
