// Attaches "drop every packet" as cgroup_skb/egress to the cgroup argv[1] (fd link), prints
// ready, waits for a line on stdin.
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/bpf.h>
int main(int argc, char **argv) {
    struct bpf_insn p[] = { { .code = BPF_ALU64|BPF_MOV|BPF_K, .imm = 0 }, { .code = BPF_JMP|BPF_EXIT } };
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_CGROUP_SKB; a.expected_attach_type = BPF_CGROUP_INET_EGRESS;
    a.insns = (unsigned long)p; a.insn_cnt = 2; a.license = (unsigned long)"GPL";
    int prog = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a); if (prog < 0) { perror("load"); return 1; }
    int cg = open(argv[1], O_RDONLY | O_DIRECTORY);
    memset(&a, 0, sizeof a); a.link_create.prog_fd = prog; a.link_create.target_fd = cg;
    a.link_create.attach_type = BPF_CGROUP_INET_EGRESS;
    int link = syscall(SYS_bpf, BPF_LINK_CREATE, &a, sizeof a); if (link < 0) { perror("link"); return 1; }
    printf("ready\n"); fflush(stdout); char l[8]; if (fgets(l, sizeof l, stdin)) {} return 0;
}
