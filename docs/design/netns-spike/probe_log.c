#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/bpf.h>
int main(void){ static char log[65536];
 struct bpf_insn i[]={{.code=BPF_JMP|BPF_CALL,.imm=BPF_FUNC_get_netns_cookie},{.code=BPF_ALU64|BPF_MOV|BPF_K,.imm=1},{.code=BPF_JMP|BPF_EXIT}};
 union bpf_attr a; memset(&a,0,sizeof a); a.prog_type=BPF_PROG_TYPE_CGROUP_SYSCTL; a.expected_attach_type=BPF_CGROUP_SYSCTL;
 a.insn_cnt=3;a.insns=(unsigned long)i;a.license=(unsigned long)"GPL";a.log_level=1;a.log_size=sizeof log;a.log_buf=(unsigned long)log;
 int fd=syscall(SYS_bpf,BPF_PROG_LOAD,&a,sizeof a); printf("fd=%d log:\n%s\n",fd,log);}
