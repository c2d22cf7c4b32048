"""Init of a code sandbox: pid 1 of the sandbox's pid namespace, inside bubblewrap (stdlib only).

`rollout.sandbox.run_sandboxed_code` copies this file into the sandbox and runs it as
`python3 -I -S init.py STATUS_FD MEMORY_MB CPU_S FSIZE_MB NPROC NOFILE -- PROGRAM ARGS...`.

1. Set the rlimits on itself; the program inherits them. This runs inside the sandbox's own user
   namespace, so RLIMIT_NPROC counts this sandbox's processes only (set outside, it would count
   every process of the host user, or the new namespace would inherit it as its ceiling).
2. Fork and exec the program, with no file descriptor but stdin/stdout/stderr.
3. Reap every process until the program exits: pid 1 inherits the orphans of the namespace.
4. Write the program's wait status to STATUS_FD and exit. When pid 1 exits, the kernel kills every
   process left in the namespace (pid_namespaces(7)), so nothing the program started outlives it,
   however it forked or detached.
Signals sent from inside the namespace to pid 1 are ignored by the kernel unless pid 1 handles them,
so the program cannot end its init early; SIGKILL from the host (the runner's timeout) still works.
"""

import os
import resource
import sys


def set_limits(memory_mb: int, cpu_s: int, fsize_mb: int, nproc: int, nofile: int) -> None:
    mb = 1024 * 1024
    # The soft CPU limit sends SIGXCPU; the hard one, a second later, is an uncatchable SIGKILL.
    for which, soft, hard in [
        (resource.RLIMIT_AS, memory_mb * mb, memory_mb * mb),
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_FSIZE, fsize_mb * mb, fsize_mb * mb),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_NOFILE, nofile, nofile),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_MEMLOCK, 0, 0),
    ]:
        resource.setrlimit(which, (soft, hard))


def main(argv: list[str]) -> None:
    status_fd = int(argv[0])
    memory_mb, cpu_s, fsize_mb, nproc, nofile = (int(x) for x in argv[1:6])
    program = argv[7:]  # argv[6] is "--"
    os.set_inheritable(status_fd, False)
    set_limits(memory_mb, cpu_s, fsize_mb, nproc, nofile)
    child = os.fork()
    if child == 0:
        os.closerange(3, 1 << 20)
        try:
            os.execv(program[0], program)
        except OSError as e:
            os.write(2, f"sandbox: cannot run {program[0]}: {e}\n".encode())
        os._exit(127)
    while True:
        pid, status = os.wait()
        if pid == child:
            break
    os.write(status_fd, f"{status}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
