// Spike of the per-netns redirect (not agent-broker code). Loads into the cgroup argv[1]:
//  - cgroup/connect4: key = bpf_get_netns_cookie(ctx); port = NETNS_LISTENERS[key] or EPERM;
//    rewrite dst to 127.0.0.1:port (the listener in the caller's own netns).
//  - sockops TCP_CONNECT_CB: REDIRECT[{netns cookie, local ip4, local port}] = socket cookie.
// argv[2..] = "<netns cookie>:<port>" entries. Prints "ready", waits for a line on stdin,
// dumps REDIRECT, exits (links are fd-based, so they go away with the process).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/syscall.h>
#include <linux/bpf.h>

static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof *a); }
static char log_buf[1 << 16];
#define I(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define LD_MAP(d, fd) I(BPF_LD|BPF_DW|BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd), I(0, 0, 0, 0, 0)

static int map_create(int type, int k, int v, int n) {
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.map_type = type; a.key_size = k; a.value_size = v; a.max_entries = n;
    int fd = bpf(BPF_MAP_CREATE, &a); if (fd < 0) { perror("map_create"); exit(1); } return fd;
}
static int prog_load(int type, int attach, struct bpf_insn *p, int n) {
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.prog_type = type; a.expected_attach_type = attach; a.insns = (unsigned long)p; a.insn_cnt = n;
    a.license = (unsigned long)"GPL"; a.log_level = 1; a.log_buf = (unsigned long)log_buf; a.log_size = sizeof log_buf;
    int fd = bpf(BPF_PROG_LOAD, &a); if (fd < 0) { perror("prog_load"); fputs(log_buf, stderr); exit(1); } return fd;
}
static int link_create(int prog, int cg, int type) {
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.link_create.prog_fd = prog; a.link_create.target_fd = cg; a.link_create.attach_type = type;
    int fd = bpf(BPF_LINK_CREATE, &a); if (fd < 0) { perror("link_create"); exit(1); } return fd;
}

int main(int argc, char **argv) {
    int cg = open(argv[1], O_RDONLY | O_DIRECTORY); if (cg < 0) { perror(argv[1]); return 1; }
    int listeners = map_create(BPF_MAP_TYPE_HASH, 8, 4, 64);
    struct key { unsigned long long netns; unsigned int ip4, port; };
    int redirect = map_create(BPF_MAP_TYPE_HASH, sizeof(struct key), 8, 64);
    for (int i = 2; i < argc; i++) {
        unsigned long long ns = strtoull(argv[i], NULL, 0);
        unsigned int port = htons(atoi(strchr(argv[i], ':') + 1)); /* user_port form: network order */
        union bpf_attr a; memset(&a, 0, sizeof a);
        a.map_fd = listeners; a.key = (unsigned long)&ns; a.value = (unsigned long)&port;
        if (bpf(BPF_MAP_UPDATE_ELEM, &a)) { perror("update"); return 1; }
    }
    struct bpf_insn connect4[] = {
        I(BPF_ALU64|BPF_MOV|BPF_X, 6, 1, 0, 0),                 /* r6 = ctx */
        I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_get_netns_cookie),/* r0 = netns cookie */
        I(BPF_STX|BPF_MEM|BPF_DW, 10, 0, -8, 0),                /* *(fp-8) = r0 */
        I(BPF_ALU64|BPF_MOV|BPF_X, 2, 10, 0, 0), I(BPF_ALU64|BPF_ADD|BPF_K, 2, 0, 0, -8),
        LD_MAP(1, listeners),
        I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
        I(BPF_JMP|BPF_JEQ|BPF_K, 0, 0, 6, 0),                   /* no listener here: refuse */
        I(BPF_LDX|BPF_MEM|BPF_W, 1, 0, 0, 0),                   /* r1 = port */
        I(BPF_STX|BPF_MEM|BPF_W, 6, 1, 24, 0),                  /* user_port = r1 */
        I(BPF_ALU64|BPF_MOV|BPF_K, 1, 0, 0, 0x0100007f),        /* 127.0.0.1 */
        I(BPF_STX|BPF_MEM|BPF_W, 6, 1, 4, 0),                   /* user_ip4 = r1 */
        I(BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, 1), I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
        I(BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, 0), I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
    };
    struct bpf_insn sockops[] = {
        I(BPF_ALU64|BPF_MOV|BPF_X, 6, 1, 0, 0),
        I(BPF_LDX|BPF_MEM|BPF_W, 2, 6, 0, 0),                   /* op */
        I(BPF_JMP|BPF_JNE|BPF_K, 2, 0, 17, BPF_SOCK_OPS_TCP_CONNECT_CB),
        I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_get_netns_cookie),
        I(BPF_STX|BPF_MEM|BPF_DW, 10, 0, -16, 0),               /* key.netns */
        I(BPF_LDX|BPF_MEM|BPF_W, 2, 6, 28, 0), I(BPF_STX|BPF_MEM|BPF_W, 10, 2, -8, 0), /* key.ip4 = local_ip4 */
        I(BPF_LDX|BPF_MEM|BPF_W, 2, 6, 68, 0), I(BPF_STX|BPF_MEM|BPF_W, 10, 2, -4, 0), /* key.port = local_port */
        I(BPF_ALU64|BPF_MOV|BPF_X, 1, 6, 0, 0),
        I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie),
        I(BPF_STX|BPF_MEM|BPF_DW, 10, 0, -24, 0),               /* value = socket cookie */
        LD_MAP(1, redirect),
        I(BPF_ALU64|BPF_MOV|BPF_X, 2, 10, 0, 0), I(BPF_ALU64|BPF_ADD|BPF_K, 2, 0, 0, -16),
        I(BPF_ALU64|BPF_MOV|BPF_X, 3, 10, 0, 0), I(BPF_ALU64|BPF_ADD|BPF_K, 3, 0, 0, -24),
        I(BPF_ALU64|BPF_MOV|BPF_K, 4, 0, 0, 0),
        I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_map_update_elem),
        I(BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, 1), I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
    };
    int p1 = prog_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT, connect4, sizeof connect4 / sizeof *connect4);
    int p2 = prog_load(BPF_PROG_TYPE_SOCK_OPS, 0, sockops, sizeof sockops / sizeof *sockops);
    int l1 = link_create(p1, cg, BPF_CGROUP_INET4_CONNECT);
    int l2 = link_create(p2, cg, BPF_CGROUP_SOCK_OPS);
    printf("ready\n"); fflush(stdout);
    char line[64]; if (!fgets(line, sizeof line, stdin)) {}
    struct key k, next; int first = 1;
    for (;;) {
        union bpf_attr a; memset(&a, 0, sizeof a);
        a.map_fd = redirect; a.key = first ? 0 : (unsigned long)&k; a.next_key = (unsigned long)&next;
        if (bpf(BPF_MAP_GET_NEXT_KEY, &a)) break;
        first = 0; k = next;
        unsigned long long cookie; memset(&a, 0, sizeof a);
        a.map_fd = redirect; a.key = (unsigned long)&k; a.value = (unsigned long)&cookie;
        bpf(BPF_MAP_LOOKUP_ELEM, &a);
        struct in_addr ip = { k.ip4 };
        printf("REDIRECT {netns=%llu, local=%s:%u} -> socket cookie %llu\n", k.netns, inet_ntoa(ip), k.port, cookie);
    }
    close(l1); close(l2);
    return 0;
}
