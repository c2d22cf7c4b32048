"""Sandbox launcher: confine this process, then exec the untrusted program in its place (stdlib only).

Run by `rollout.rewards.run_sandboxed_code` as
`python -I -S sandbox_launcher.py MEMORY_MB CPU_S FSIZE_MB NPROC ALLOW_NETWORK INTERPRETER PROGRAM`.
It runs after fork+exec, so nothing here races with the parent's threads (unlike `preexec_fn`, which
the subprocess docs call unsafe in threaded programs such as Ray actors and vLLM).

Order matters: (1) leave the network namespace (needs root, else an unprivileged user namespace),
(2) set rlimits, (3) drop root to `nobody` (RLIMIT_NPROC binds only non-root users), (4) exec.
If isolation fails and the network is not explicitly allowed, exit 125 with a `sandbox:` message on
stderr, so the caller fails closed instead of running untrusted code with network access.
"""

import ctypes
import os
import pwd
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
EXIT_SANDBOX_FAILED = 125


def _leave_network() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    return libc.unshare(flags) == 0


def _set_limits(memory_mb: int, cpu_s: int, fsize_mb: int, nproc: int) -> None:
    mb = 1024 * 1024
    # Soft CPU limit sends SIGXCPU; the hard limit one second later is an uncatchable SIGKILL.
    for which, soft, hard in [
        (resource.RLIMIT_AS, memory_mb * mb, memory_mb * mb),
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_FSIZE, fsize_mb * mb, fsize_mb * mb),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_CORE, 0, 0),
    ]:
        resource.setrlimit(which, (soft, hard))


def _drop_root() -> None:
    if os.geteuid() != 0:
        return
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def main(argv: list[str]) -> None:
    memory_mb, cpu_s, fsize_mb, nproc = (int(x) for x in argv[:4])
    allow_network, interpreter, program = argv[4] == "1", argv[5], argv[6]
    if not _leave_network() and not allow_network:
        sys.stderr.write(
            f"sandbox: cannot isolate the network (unshare errno {ctypes.get_errno()}); "
            "run as root or enable unprivileged user namespaces, or pass allow_network=True\n"
        )
        sys.exit(EXIT_SANDBOX_FAILED)
    _set_limits(memory_mb, cpu_s, fsize_mb, nproc)
    _drop_root()
    os.execv(interpreter, [interpreter, "-I", "-S", "-B", program])


if __name__ == "__main__":
    main(sys.argv[1:])
