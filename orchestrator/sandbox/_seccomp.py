"""The seccomp deny-list every sandboxed sidecar runs under, compiled by libseccomp.

Denied calls fail with EPERM rather than killing the process: programs that
merely probe for a feature keep working, and a plugin that tries something
forbidden sees a clear "Operation not permitted". bwrap loads the filter (with
no_new_privs) just before it executes the sidecar, after it has built the
namespaces the filter then forbids.
"""

from __future__ import annotations

import errno
import functools
import os

#: System calls no plugin needs, and that attacks use.
DENIED = (
    # Inspecting or changing other processes.
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # Namespaces and mounts: escaping or reshaping the sandbox.
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # The kernel itself.
    "bpf", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "syslog", "acct", "iopl", "ioperm", "quotactl",
    "lookup_dcookie", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "vhangup",
    # Kernel keyrings.
    "keyctl", "add_key", "request_key",
    # Files by handle (bypassing paths) and the machine's clock.
    "open_by_handle_at", "name_to_handle_at", "settimeofday", "clock_settime", "adjtimex",
    "clock_adjtime",
    # NUMA memory placement.
    "mbind", "migrate_pages", "move_pages", "set_mempolicy",
)  # fmt: skip
_CLONE_NEWUSER = 0x10000000


@functools.cache
def compiled_filter(no_fallocate: bool = False) -> bytes:
    """The BPF program of the deny-list, for this machine's architecture.

    ``no_fallocate``: ``fallocate`` fails with EOPNOTSUPP (as on a filesystem
    without it; glibc's ``posix_fallocate`` then writes zeros instead), for a
    data dir whose quota is accounted by the bytes written.
    """
    import pyseccomp as seccomp

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a system call on this architecture
    # clone3 takes its flags in a struct seccomp cannot read: make callers fall back to
    # clone, whose flags it can check, and refuse new user namespaces there.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    if no_fallocate:
        rules.add_rule(seccomp.ERRNO(errno.EOPNOTSUPP), "fallocate")
    rules.add_rule(
        seccomp.ERRNO(errno.EPERM), "clone",
        seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_NEWUSER, _CLONE_NEWUSER),
    )  # fmt: skip
    fd = os.memfd_create("sidemesh-seccomp")
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            rules.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def filter_fd(no_fallocate: bool = False) -> int:
    """A fresh readable file descriptor holding the compiled filter (for ``bwrap --seccomp``)."""
    fd = os.memfd_create("sidemesh-seccomp")
    os.write(fd, compiled_filter(no_fallocate))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
