"""OS isolation for simulated enclaves and function sandboxes: real kernel mechanisms.

Applied inside a freshly forked child before it runs untrusted or enclave code:
- its own session (``setsid``), killed with its parent (``PR_SET_PDEATHSIG``);
- not dumpable (``PR_SET_DUMPABLE`` 0): other processes of the same user cannot ptrace it or
  read ``/proc/<pid>/mem``;
- rlimits: data segment (the enclave size), CPU seconds, no core files;
- every capability dropped once the private mounts are made (a root-run service would otherwise
  give enclave and function code CAP_SYS_PTRACE over the enclave runtime's memory);
- a seccomp filter (x86_64) that refuses ptrace, process_vm_*, mounts (the old and the new mount
  API: a clone of ``/`` made with ``open_tree`` shows what the hidden-path tmpfs covers),
  namespaces (``unshare``, ``setns``, and ``clone`` with a namespace flag; ``clone3``, whose
  flags a filter cannot read, answers ENOSYS so libc falls back to ``clone``), kernel modules,
  BPF, perf, keyrings, and IPv4/IPv6/packet sockets.
Bubblewrap (no network, read-only root) wraps the whole zygote where it is installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import resource
import shutil
import signal
import struct
from collections.abc import Sequence
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SECCOMP_MODE_FILTER = 2

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_AUDIT_ARCH_X86_64 = 0xC000003E

# x86_64 syscall numbers refused inside enclaves and function sandboxes
DENIED_SYSCALLS_X86_64: dict[str, int] = {
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "acct": 163,
    "settimeofday": 164,
    "clock_settime": 227,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "finit_module": 313,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "setns": 308,
    "perf_event_open": 298,
    "bpf": 321,
    "userfaultfd": 323,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    # the new mount API: open_tree(OPEN_TREE_CLONE) of a parent directory is a mount without the
    # tmpfs that hides the service's data directory under it
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}
_SYS_CLONE_X86_64 = 56
_SYS_CLONE3_X86_64 = 435
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (and CLONE_NEWTIME)
CLONE_NAMESPACE_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
)
_SYS_SOCKET_X86_64 = 41
DENIED_SOCKET_FAMILIES = {"AF_INET": 2, "AF_INET6": 10, "AF_PACKET": 17}


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int | None = None  # RLIMIT_DATA: heap and anonymous mappings
    cpu_seconds: int | None = None
    open_files: int = 1024
    deny_network: bool = True
    seccomp: bool = True
    private_tmp: bool = True  # own mount namespace with a private /tmp (no files shared between enclaves)
    # host directories enclave code must never read (the service's data directory: KEK, tokens,
    # simulated roots; its configuration and key files): an empty read-only tmpfs covers each
    hidden_paths: tuple[str, ...] = ()


CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RDONLY = 0x1
MS_BIND = 0x1000


def _code_roots_under(path: str) -> list[str]:
    """The interpreter's and this package's directories below ``path`` (a checkout or venv in /tmp)."""
    import sys

    import r3e_tee

    roots = (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(r3e_tee.__file__)))
    prefix = path.rstrip("/") + "/"
    return sorted({os.path.realpath(r) for r in roots if os.path.realpath(r).startswith(prefix)})


def private_tmp(size_bytes: int = 64 * 1024 * 1024, hidden: tuple[str, ...] = ()) -> list[str]:
    """A mount namespace of our own with an empty tmpfs on /tmp (and /dev/shm when present), and
    empty read-only tmpfs over every ``hidden`` directory. Returns what it had to leave out."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    if uid != 0:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"making mounts private: {os.strerror(err)}")
    skipped: list[str] = []
    options = f"size={size_bytes},mode=0700".encode()
    for target in ("/tmp", "/dev/shm"):  # noqa: S108 - the mount points we replace
        if not os.path.isdir(target):
            continue
        # code living below the mount point (a checkout or venv in /tmp) is bound back on top
        keep = [(root, os.open(root, os.O_PATH | os.O_DIRECTORY)) for root in _code_roots_under(target)]
        try:
            if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, options) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mounting a private tmpfs on {target}: {os.strerror(err)}")
            for root, fd in keep:
                os.makedirs(root, exist_ok=True)
                source = f"/proc/self/fd/{fd}".encode()
                if libc.mount(source, root.encode(), None, MS_BIND | MS_REC, None) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"keeping {root} visible: {os.strerror(err)}")
        finally:
            for _, fd in keep:
                os.close(fd)
    for path in hidden:
        if (
            os.path.isdir(path)
            and libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY, b"size=4k,mode=0") != 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"hiding {path}: {os.strerror(err)}")
    return skipped


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    """libc, loaded once: find_library runs ldconfig, far too slow for every fork."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def warm() -> None:
    """Load what apply_in_child needs before forking (the zygote calls this once)."""
    _libc()


def _prctl(option: int, arg2: int | ctypes.c_void_p = 0) -> None:
    libc = _libc()
    if libc.prctl(option, arg2, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def set_dumpable(dumpable: bool) -> None:
    """Not dumpable: other processes of the same user (enclaves, functions) cannot read this
    one's /proc/<pid>/mem, environ or fd, nor ptrace it."""
    _prctl(PR_SET_DUMPABLE, 1 if dumpable else 0)


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the parent dies (enclaves never outlive their host)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def drop_capabilities() -> None:
    """Give up every capability, for good: the bounding and ambient sets, then the effective,
    permitted and inheritable ones. Root (or a user namespace's owner) keeps its uid but no
    longer passes ptrace checks on non-dumpable processes or overrides file permissions."""
    libc = _libc()
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                break  # past the kernel's last capability
            if err != errno.EPERM:  # EPERM: no CAP_SETPCAP, and then nothing to drop here either
                raise OSError(err, f"dropping capability {cap}: {os.strerror(err)}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: none

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    header = CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all zero
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def seccomp_supported() -> tuple[bool, str]:
    if platform.system() != "Linux":
        return False, "seccomp needs Linux"
    if platform.machine() != "x86_64":
        return False, f"the seccomp filter is written for x86_64, not {platform.machine()}"
    return True, "seccomp filter available (x86_64)"


def _stmt(code: int, k: int) -> bytes:
    """One classic-BPF statement."""
    return struct.pack("HBBI", code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    """One classic-BPF conditional jump (``jt``/``jf``: instructions to skip)."""
    return struct.pack("HBBI", code, jt, jf, k)


def build_seccomp_program(denied: Sequence[int], *, deny_network: bool) -> bytes:
    """A classic-BPF seccomp program; denied calls fail with EPERM, a foreign arch is killed."""
    eperm = _RET_ERRNO | errno.EPERM
    prog = [
        _stmt(_BPF_LD_W_ABS, 4),  # seccomp_data.arch
        _jump(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0),
        _stmt(_BPF_RET_K, _RET_KILL_PROCESS),
        _stmt(_BPF_LD_W_ABS, 0),  # seccomp_data.nr
        _jump(_BPF_JGE_K, 0x40000000, 0, 1),  # the x32 ABI
        _stmt(_BPF_RET_K, eperm),
    ]
    for nr in denied:
        prog += [_jump(_BPF_JEQ_K, nr, 0, 1), _stmt(_BPF_RET_K, eperm)]
    prog += [_jump(_BPF_JEQ_K, _SYS_CLONE3_X86_64, 0, 1), _stmt(_BPF_RET_K, _RET_ERRNO | errno.ENOSYS)]
    # clone with a namespace flag: a new user namespace is a full set of capabilities again
    prog += [
        _jump(_BPF_JEQ_K, _SYS_CLONE_X86_64, 0, 4),
        _stmt(_BPF_LD_W_ABS, 16),  # args[0] (flags), low 32 bits
        _jump(_BPF_JSET_K, CLONE_NAMESPACE_FLAGS, 0, 1),
        _stmt(_BPF_RET_K, eperm),
        _stmt(_BPF_LD_W_ABS, 0),  # seccomp_data.nr again, for the checks below
    ]
    if deny_network:
        families = sorted(DENIED_SOCKET_FAMILIES.values())
        n = len(families)
        # jeq socket -> [ld arg0, jeq fam_i..., ret allow, ret EAFNOSUPPORT]; else skip the block
        prog.append(_jump(_BPF_JEQ_K, _SYS_SOCKET_X86_64, 0, n + 3))
        prog.append(_stmt(_BPF_LD_W_ABS, 16))  # args[0], low 32 bits
        for i, fam in enumerate(families):
            prog.append(_jump(_BPF_JEQ_K, fam, n - i, 0))
        prog.append(_stmt(_BPF_RET_K, _RET_ALLOW))
        prog.append(_stmt(_BPF_RET_K, _RET_ERRNO | errno.EAFNOSUPPORT))
    prog.append(_stmt(_BPF_RET_K, _RET_ALLOW))
    return b"".join(prog)


def install_seccomp(*, deny_network: bool = True) -> None:
    ok, why = seccomp_supported()
    if not ok:
        raise OSError(errno.ENOSYS, why)
    _load_seccomp(build_seccomp_program(list(DENIED_SYSCALLS_X86_64.values()), deny_network=deny_network))


# x86_64 syscalls a function sandbox has no use for: new processes and programs (a fork-bombing
# handler, or a grandchild that outlives the deadline's kill), io_uring, and pidfds
FUNCTION_DENIED_SYSCALLS_X86_64: dict[str, int] = {
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "execveat": 322,
    "pidfd_open": 434,
    "pidfd_send_signal": 424,
    "pidfd_getfd": 438,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}
# signals go only to the sandbox itself (first argument: a pid or thread group id)
_SIGNAL_SYSCALLS_X86_64 = (62, 200, 234, 129, 297)  # kill, tkill, tgkill, rt_(tg)sigqueueinfo
_SYS_IOCTL_X86_64 = 16
#: the Nitro Secure Module's one ioctl (runtime/nsm.py): attestation documents over any key
NSM_IOCTL_REQUEST = 0xC0200A00
_CLONE_THREAD = 0x00010000


def build_function_seccomp_program(own_pid: int) -> bytes:
    """The filter a function sandbox adds on top of its enclave's: no processes but threads, no
    programs, signals to itself only, no NSM attestation (the runtime's own evidence)."""
    eperm = _RET_ERRNO | errno.EPERM
    prog = [
        _stmt(_BPF_LD_W_ABS, 4),
        _jump(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0),
        _stmt(_BPF_RET_K, _RET_KILL_PROCESS),
        _stmt(_BPF_LD_W_ABS, 0),
    ]
    for nr in FUNCTION_DENIED_SYSCALLS_X86_64.values():
        prog += [_jump(_BPF_JEQ_K, nr, 0, 1), _stmt(_BPF_RET_K, eperm)]
    prog += [  # clone: threads only
        _jump(_BPF_JEQ_K, _SYS_CLONE_X86_64, 0, 4),
        _stmt(_BPF_LD_W_ABS, 16),
        _jump(_BPF_JSET_K, _CLONE_THREAD, 0, 1),
        _stmt(_BPF_RET_K, _RET_ALLOW),
        _stmt(_BPF_RET_K, eperm),
    ]
    prog += [  # ioctl(fd, NSM_IOCTL_REQUEST, ...)
        _jump(_BPF_JEQ_K, _SYS_IOCTL_X86_64, 0, 4),
        _stmt(_BPF_LD_W_ABS, 24),  # args[1], low 32 bits
        _jump(_BPF_JEQ_K, NSM_IOCTL_REQUEST, 0, 1),
        _stmt(_BPF_RET_K, eperm),
        _stmt(_BPF_RET_K, _RET_ALLOW),
    ]
    n = len(_SIGNAL_SYSCALLS_X86_64)
    for i, nr in enumerate(_SIGNAL_SYSCALLS_X86_64):
        prog.append(_jump(_BPF_JEQ_K, nr, n - i, 0))
    prog.append(_stmt(_BPF_RET_K, _RET_ALLOW))
    prog += [
        _stmt(_BPF_LD_W_ABS, 16),  # args[0]: the target
        _jump(_BPF_JEQ_K, own_pid & 0xFFFFFFFF, 0, 1),
        _stmt(_BPF_RET_K, _RET_ALLOW),
        _stmt(_BPF_RET_K, eperm),
    ]
    return b"".join(prog)


def _load_seccomp(program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if _libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter failed: {os.strerror(err)}")


def confine_function(keep_fd: int, memory_bytes: int) -> list[str]:
    """Confine a function sandbox just forked from its enclave runtime, before any function
    code runs. Returns what could not be applied.

    - every descriptor but ``keep_fd`` (its socket) and stdio is closed: the runtime's channel
      to its host and the runtime's ends of sibling sandboxes' sockets are not the function's;
    - RLIMIT_AS: what is mapped now plus ``memory_bytes``. RLIMIT_DATA alone misses shared
      anonymous mappings (``mmap.mmap(-1, n)``), which would let a function take any amount;
    - the function seccomp filter (build_function_seccomp_program).
    """
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    missing: list[str] = []
    try:  # a library OS (Gramine) may not offer /proc/self/statm or RLIMIT_AS: report, go on
        with open("/proc/self/statm", "rb") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError, IndexError) as exc:
        missing.append(f"RLIMIT_AS: {exc}")
    ok, why = seccomp_supported()
    if not ok:
        return [*missing, f"seccomp: {why}"]
    try:
        _load_seccomp(build_function_seccomp_program(os.getpid()))
    except OSError as exc:
        missing.append(f"seccomp: {exc.strerror}")
    return missing


def apply_in_child(limits: SandboxLimits, *, new_session: bool = True) -> list[str]:
    """Confine the calling (freshly forked) process. Returns what could not be applied."""
    missing: list[str] = []
    if new_session:
        try:
            os.setsid()
        except OSError:
            missing.append("setsid")
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(PR_SET_DUMPABLE, 0)
    except OSError as exc:
        missing.append(f"prctl: {exc.strerror}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    if limits.memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
    if limits.cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    if limits.private_tmp:
        try:
            missing += private_tmp(hidden=limits.hidden_paths)
        except OSError as exc:
            missing.append(f"private /tmp: {exc.strerror}")
    try:
        drop_capabilities()
    except OSError as exc:
        missing.append(f"capabilities: {exc.strerror}")
    if limits.seccomp:
        try:
            install_seccomp(deny_network=limits.deny_network)
        except OSError as exc:
            missing.append(f"seccomp: {exc.strerror}")
    return missing


def bubblewrap_argv(*, writable: Sequence[str] = ()) -> list[str] | None:
    """The bwrap prefix for a network-less, read-only-root process tree, or None without bwrap.

    /tmp stays the host's (read-only here): the code may live under it, and every enclave
    mounts a private tmpfs of its own on /tmp (see private_tmp)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    argv = [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
    ]  # fmt: skip
    if os.getuid() != 0:
        argv.append("--unshare-user")
    for path in writable:
        argv += ["--bind", path, path]
    return argv
