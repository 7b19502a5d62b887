set -u
n=abspike-$RANDOM-skb; cg=/sys/fs/cgroup/unified/$n
ip netns add $n; ip -n $n link set lo up; mkdir $cg
probe='import socket
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
try:
    s.sendto(b"x",("127.0.0.1",9)); print("sendto 127.0.0.1:9 from the netns: sent")
except OSError as e: print("sendto 127.0.0.1:9 from the netns:", e)'
echo "-- in the cgroup, netns $n, no program:"; sh -c "echo \$\$ > $cg/cgroup.procs; exec nsenter --net=/run/netns/$n python3 -c '$probe'"
coproc L { ./skbdrop $cg; }; read -r ready <&"${L[0]}"; echo "skbdrop: $ready"
echo "-- same, with cgroup_skb/egress dropping:"; sh -c "echo \$\$ > $cg/cgroup.procs; exec nsenter --net=/run/netns/$n python3 -c '$probe'"
echo >&"${L[1]}"; wait
sleep 0.2; rmdir $cg; ip netns del $n; ip netns list | grep abspike || echo "cleanup ok"
