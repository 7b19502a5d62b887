// Loads a 3-instruction program "r0 = helper(ctx); r0 = 1; exit" for each cgroup program type
// agent-broker uses, and reports whether the verifier accepts the helper there.
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <sys/syscall.h>
#include <linux/bpf.h>

static char logbuf[65536];

static int load(int type, int attach, int helper, const char **why) {
    struct bpf_insn insns[] = {
        { .code = BPF_JMP | BPF_CALL, .imm = helper },            /* r1 = ctx on entry */
        { .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 1 },
        { .code = BPF_JMP | BPF_EXIT },
    };
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.prog_type = type; a.insn_cnt = 3; a.insns = (unsigned long)insns;
    a.license = (unsigned long)"GPL"; a.expected_attach_type = attach;
    a.log_level = 1; a.log_size = sizeof logbuf; a.log_buf = (unsigned long)logbuf;
    logbuf[0] = 0;
    int fd = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a);
    if (fd >= 0) { close(fd); *why = ""; return 1; }
    char *nl = strrchr(logbuf, '\n'); if (nl && nl > logbuf) { *nl = 0; nl = strrchr(logbuf, '\n'); }
    *why = nl ? nl + 1 : logbuf;
    return 0;
}

int main(void) {
    struct { const char *name; int type, attach; } progs[] = {
        {"cgroup/connect4 (sock_addr)", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT},
        {"cgroup/connect6", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT},
        {"cgroup/sendmsg4", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG},
        {"cgroup/recvmsg4", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_RECVMSG},
        {"cgroup/getpeername4", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_GETPEERNAME},
        {"cgroup/bind4", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_BIND},
        {"cgroup/sock_create (cgroup_sock)", BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE},
        {"sockops", BPF_PROG_TYPE_SOCK_OPS, 0},
        {"cgroup_skb/egress", BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_EGRESS},
        {"cgroup_skb/ingress", BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_INGRESS},
        {"cgroup_sysctl (control: expect no)", BPF_PROG_TYPE_CGROUP_SYSCTL, BPF_CGROUP_SYSCTL},
    };
    struct { const char *name; int id; } helpers[] = {
        {"bpf_get_netns_cookie", BPF_FUNC_get_netns_cookie},
        {"bpf_get_socket_cookie", BPF_FUNC_get_socket_cookie},
    };
    for (unsigned i = 0; i < sizeof progs / sizeof *progs; i++)
        for (unsigned h = 0; h < 2; h++) {
            const char *why;
            int ok = load(progs[i].type, progs[i].attach, helpers[h].id, &why);
            printf("%-36s %-22s %s %s\n", progs[i].name, helpers[h].name, ok ? "OK" : "REJECTED:", why);
        }
    return 0;
}
