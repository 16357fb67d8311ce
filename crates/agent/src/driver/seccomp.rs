//! The seccomp profile of `oci` jobs, as data: an allow-list by system-call
//! name for x86_64 (on aarch64 the same names resolve), modelled on
//! the default profile Docker/Moby ship, with everything else refused with
//! EPERM.
//!
//! It is stricter than Moby's: a job has no capabilities, so the calls Moby
//! allows only to holders of a capability (mount, unshare, setns, bpf,
//! ptrace, module loading, clock setting, ...) are never allowed; io_uring,
//! keyctl, personality, modify_ldt and handle-based opens are left out;
//! `clone` is allowed only without namespace flags, and `clone3` answers
//! ENOSYS (seccomp cannot read its flags, which live in memory) so that libc
//! falls back to `clone`. Only the native ABI is allowed: a 32-bit binary
//! is killed by the filter, which closes the old hole of filtering one ABI
//! and forgetting the other.

use serde_json::json;

/// System calls a job may make, unconditionally. Moby's default list less
/// the 32-bit-only names and the calls named in the module comment.
#[rustfmt::skip]
pub const ALLOWED_SYSCALLS: &[&str] = &[
    "accept", "accept4", "access", "alarm", "arch_prctl", "bind", "brk",
    "cachestat", "capget", "capset", "chdir", "chmod", "chown",
    "clock_getres", "clock_gettime", "clock_nanosleep", "close",
    "close_range", "connect", "copy_file_range", "creat", "dup", "dup2",
    "dup3", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "eventfd", "eventfd2", "execve",
    "execveat", "exit", "exit_group", "faccessat", "faccessat2",
    "fadvise64", "fallocate", "fchdir", "fchmod", "fchmodat", "fchmodat2",
    "fchown", "fchownat", "fcntl", "fdatasync", "fgetxattr", "flistxattr",
    "flock", "fork", "fremovexattr", "fsetxattr", "fstat", "fstatfs",
    "fsync", "ftruncate", "futex", "futex_requeue", "futex_wait",
    "futex_waitv", "futex_wake", "futimesat", "getcpu", "getcwd",
    "getdents", "getdents64", "getegid", "geteuid", "getgid", "getgroups",
    "getitimer", "getpeername", "getpgid", "getpgrp", "getpid", "getppid",
    "getpriority", "getrandom", "getresgid", "getresuid", "getrlimit",
    "get_robust_list", "getrusage", "getsid", "getsockname", "getsockopt",
    "get_thread_area", "gettid", "gettimeofday", "getuid", "getxattr",
    "getxattrat", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "ioprio_get", "ioprio_set", "io_setup", "io_submit",
    "kill", "landlock_add_rule", "landlock_create_ruleset",
    "landlock_restrict_self", "lchown", "lgetxattr", "link", "linkat",
    "listen", "listmount", "listxattr", "listxattrat", "llistxattr",
    "lremovexattr", "lseek", "lsetxattr", "lstat", "madvise",
    "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret",
    "mincore", "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2",
    "mlockall", "mmap", "mprotect", "mq_getsetattr", "mq_notify", "mq_open",
    "mq_timedreceive", "mq_timedsend", "mq_unlink", "mremap", "mseal",
    "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock",
    "munlockall", "munmap", "nanosleep", "newfstatat", "open", "openat",
    "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "poll", "ppoll", "prctl",
    "pread64", "preadv", "preadv2", "prlimit64", "process_mrelease",
    "pselect6", "pwrite64", "pwritev", "pwritev2", "read", "readahead",
    "readlink", "readlinkat", "readv", "recvfrom", "recvmmsg", "recvmsg",
    "remap_file_pages", "removexattr", "removexattrat", "rename",
    "renameat", "renameat2", "restart_syscall", "rmdir", "rseq",
    "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_tgsigqueueinfo",
    "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_get_priority_max", "sched_get_priority_min",
    "sched_getscheduler", "sched_rr_get_interval", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield",
    "seccomp", "select", "semctl", "semget", "semop", "semtimedop",
    "sendfile", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsuid",
    "setgid", "setgroups", "setitimer", "setpgid", "setpriority",
    "setregid", "setresgid", "setresuid", "setreuid", "setrlimit",
    "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setxattr", "setxattrat", "shmat",
    "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd",
    "signalfd4", "socketpair", "splice", "stat", "statfs", "statmount",
    "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs",
    "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_settime", "timerfd_create",
    "timerfd_gettime", "timerfd_settime", "times", "tkill", "truncate",
    "umask", "uname", "unlink", "unlinkat", "uretprobe", "utime",
    "utimensat", "utimes", "vfork", "vmsplice", "wait4", "waitid", "write",
    "writev",
];

/// Calls a job must never make; none may appear in [`ALLOWED_SYSCALLS`]
/// (checked by a test, so a later edit of the list cannot let one in).
#[rustfmt::skip]
pub const NEVER_ALLOWED_SYSCALLS: &[&str] = &[
    "mount", "umount", "umount2", "pivot_root", "chroot", "fsopen",
    "fsmount", "fsconfig", "fspick", "move_mount", "open_tree",
    "mount_setattr", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "ptrace", "process_vm_readv",
    "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp", "keyctl",
    "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "swapon", "swapoff", "reboot", "setns", "unshare", "clone3",
    "open_by_handle_at", "name_to_handle_at", "syslog", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl",
    "ioperm", "quotactl", "quotactl_fd", "lookup_dcookie", "fanotify_init",
    "fanotify_mark", "sethostname", "setdomainname", "personality",
    "modify_ldt", "vhangup", "nfsservctl", "create_module",
    "get_kernel_syms", "query_module", "uselib", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "ustat", "sysfs", "_sysctl",
    "vm86", "vm86old", "mbind", "set_mempolicy", "migrate_pages",
    "move_pages",
];

/// Namespace flags of clone(2): a job may not make namespaces (a new user
/// namespace would hand it a full set of capabilities inside it).
pub const CLONE_NAMESPACE_FLAGS_MASK: u64 = 0x0000_0080 // CLONE_NEWTIME
    | 0x0002_0000 // CLONE_NEWNS
    | 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000; // CLONE_NEWNET

/// Socket families no job needs and whose kernel code has a history of
/// holes: AF_ALG (kernel crypto) and AF_VSOCK (to the hypervisor), as Moby.
const AF_ALG: u64 = 38;
const AF_VSOCK: u64 = 40;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The `linux.seccomp` object of a job's runc config.
pub fn profile() -> serde_json::Value {
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        // No "architectures": the filter then knows only the host's native
        // ABI, and calls through any other (i386, x32) kill the job. Each
        // listed architecture also adds to runc's filter build, ~10 ms per
        // job start for this list.
        "syscalls": rules()
    })
}

fn rules() -> serde_json::Value {
    json!([
        {"names": ALLOWED_SYSCALLS, "action": "SCMP_ACT_ALLOW"},
        // Allowed when (flags & mask) == 0: no namespace flag at all.
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        // Rules for one call are ORed: every family but AF_ALG and AF_VSOCK.
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": AF_ALG, "op": "SCMP_CMP_LT"}]},
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": AF_ALG + 1, "op": "SCMP_CMP_EQ"}]},
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_GT"}]}
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_holds_what_a_shell_needs_and_nothing_dangerous() {
        for needed in [
            "read",
            "write",
            "execve",
            "openat",
            "mmap",
            "exit_group",
            "wait4",
        ] {
            assert!(
                ALLOWED_SYSCALLS.contains(&needed),
                "{needed} must be allowed"
            );
        }
        for never in NEVER_ALLOWED_SYSCALLS {
            assert!(
                !ALLOWED_SYSCALLS.contains(never),
                "{never} must not be allowed"
            );
        }
        // clone and socket are allowed only under conditions, never by name.
        assert!(!ALLOWED_SYSCALLS.contains(&"clone") && !ALLOWED_SYSCALLS.contains(&"socket"));
    }

    #[test]
    fn everything_not_listed_is_refused_with_eperm() {
        let profile = profile();
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(
            profile.get("architectures").is_none(),
            "the native ABI only"
        );
        assert_eq!(profile["defaultErrnoRet"], 1);
        let rules = profile["syscalls"].as_array().unwrap();
        // Only clone3 has a refusing rule, and it answers ENOSYS.
        let refusals: Vec<_> = rules
            .iter()
            .filter(|r| r["action"] != "SCMP_ACT_ALLOW")
            .collect();
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0]["names"][0], "clone3");
        assert_eq!(refusals[0]["errnoRet"], 38);
    }

    #[test]
    fn clone_is_allowed_only_without_namespace_flags() {
        let profile = profile();
        let clone = profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"][0] == "clone")
            .unwrap();
        let condition = &clone["args"][0];
        assert_eq!(condition["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(condition["valueTwo"], 0);
        let mask = condition["value"].as_u64().unwrap();
        for flag in [
            0x80u64,
            0x2_0000,
            0x200_0000,
            0x400_0000,
            0x800_0000,
            0x1000_0000,
            0x2000_0000,
            0x4000_0000,
        ] {
            assert_eq!(mask & flag, flag, "flag {flag:#x} is in the mask");
        }
        // CLONE_THREAD | CLONE_VM | SIGCHLD, what threads and fork use, pass.
        assert_eq!(mask & (0x1_0000 | 0x100 | 17), 0);
    }

    #[test]
    fn the_list_has_no_duplicates() {
        let mut sorted = ALLOWED_SYSCALLS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALLOWED_SYSCALLS.len());
    }
}
