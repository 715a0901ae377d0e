"""Folder locks between real processes: a second process is refused with the holder's pid and host, a lock
left by a process killed with -9 does not block, ``wait=True`` waits for the holder, and a process may
take its own lock again."""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from retina_scale.utils.locking import LOCK_FILE, LockedError, folder_lock, holder_of, locked_folder


def test_a_second_process_is_refused_with_the_holders_pid_and_host(tmp_path, lock_holder):
    proc = lock_holder(tmp_path / "run")
    with pytest.raises(LockedError) as info:
        with folder_lock(tmp_path / "run", "run folder", hint="use another name (name=...)"):
            pass
    message = str(info.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message
    assert message.startswith(f"run folder {tmp_path / 'run'} is in use by") and "use another name" in message
    assert "\n" not in message and info.value.pid == proc.pid
    assert isinstance(info.value, ValueError)  # a UserError: one line at the command line


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, lock_holder):
    proc = lock_holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists() and holder_of(tmp_path / "run")["pid"] == proc.pid  # stale
    with folder_lock(tmp_path / "run", "run folder"):
        assert holder_of(tmp_path / "run")["pid"] == os.getpid()
    assert holder_of(tmp_path / "run") == {}  # released: the file names nobody


def test_wait_waits_for_the_holder_and_says_whom_it_waits_for(tmp_path, lock_holder):
    proc = lock_holder(tmp_path / "cache")
    lines, done = [], threading.Event()

    def second():
        with folder_lock(tmp_path / "cache", "cache", wait=True, log=lines.append):
            done.set()

    thread = threading.Thread(target=second)
    thread.start()
    try:
        assert not done.wait(1.0), "took a lock another process holds"
        assert lines == [f"waiting for cache {tmp_path / 'cache'}: in use by pid {proc.pid} on host "
                         f"{socket.gethostname()}, since {holder_of(tmp_path / 'cache')['since']}"]
    finally:
        proc.stdin.close()  # the holder lets go
        thread.join(60)
    assert done.is_set() and proc.wait(60) == 0


def test_a_process_may_take_its_own_lock_again(tmp_path, lock_holder, subprocess_env):
    folder = tmp_path / "run"
    with folder_lock(folder, "run folder"):
        with folder_lock(folder, "run folder"):
            pass
        # Still held after the inner block: another process is refused.
        code = subprocess.run([sys.executable, "-c", lock_holder.script, str(folder)], env=subprocess_env, input="",
                              capture_output=True, text=True, timeout=120)
        assert code.returncode == 1 and f"is in use by pid {os.getpid()}" in code.stderr
    lock_holder(folder)  # released now: another process takes it


def test_locked_folder_names_the_argument_to_lock(tmp_path, lock_holder):
    @locked_folder("out", "cache")
    def prepare(data, out, sizes=(112,)):
        """Docstring kept."""
        return holder_of(out)["pid"]

    assert prepare(1, tmp_path / "c") == os.getpid() and prepare.__doc__ == "Docstring kept."
    lock_holder(tmp_path / "c")
    with pytest.raises(LockedError, match="cache .* is in use by pid"):
        prepare(1, out=tmp_path / "c")


FORKING_HOLDER = """
import os, sys, time
from retina_scale.utils.locking import folder_lock
with folder_lock(sys.argv[1], "cache"):
    child = os.fork()
    if child == 0:  # a worker of a fork pool: it outlives its parent here
        print(os.getpid(), flush=True)  # said by the child, so its fork hooks have run (the parent may not wait)
        time.sleep(120)
        os._exit(0)
    sys.stdin.readline()
"""


def test_a_forked_worker_outliving_its_killed_parent_does_not_keep_the_lock(tmp_path, subprocess_env):
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path / "c")], env=subprocess_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child still runs
        with folder_lock(tmp_path / "c", "cache"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
