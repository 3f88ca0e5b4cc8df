"""Subprocesses that leave evidence when they hang.

Every test that starts a process runs it through `run` or `popen`, with a
timeout. The child gets `PYTHONFAULTHANDLER=1` and, in `WATCHDOG`, a time a
little shorter than the timeout; the test scripts (`python -m tests.…`)
call `arm()` first, which dumps every thread's Python stack to stderr at
that time (`faulthandler.dump_traceback_later`) and exits. A child that
has not armed (a `-c` snippet, an example) is sent `SIGABRT` at the
timeout, on which `PYTHONFAULTHANDLER` dumps the stacks too. A hang then
fails its test with the stacks of where each thread waited, instead of a
bare timeout.
"""

import faulthandler
import os
import signal
import subprocess
import sys

WATCHDOG = "KSD_WATCHDOG_SECONDS"


def arm():
    """Dumps every thread's stack and exits when the watchdog's time is up
    (called first by the scripts the tests start; a no-op elsewhere)."""
    seconds = os.environ.get(WATCHDOG)
    if seconds:
        faulthandler.enable()
        faulthandler.dump_traceback_later(float(seconds), exit=True)


def popen(command, *, timeout, env=None, **kwargs):
    """`subprocess.Popen` with the watchdog armed for `timeout` seconds;
    wait with `wait(process)`."""
    env = dict(os.environ if env is None else env)
    env["PYTHONFAULTHANDLER"] = "1"
    # The child's own dump first, a little before the test gives up.
    env[WATCHDOG] = str(max(timeout - min(30.0, timeout / 10), 1.0))
    process = subprocess.Popen(command, env=env, **kwargs)
    process.watchdog_timeout = timeout
    return process


def wait(process):
    """The exit code of a `popen` child; at its timeout the child is made
    to dump its threads' stacks (`SIGABRT`), then killed, and the test
    fails."""
    timeout = process.watchdog_timeout
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _abort(process)
        raise AssertionError(
            f"{_name(process.args)} did not end in {timeout:.0f} s; "
            "its threads' stacks are on its stderr above"
        ) from None


def run(command, *, timeout, check=False, env=None, **kwargs):
    """`subprocess.run` with the watchdog (see `popen`); a timeout fails
    with the child's stderr, its threads' stacks included."""
    capture = kwargs.pop("capture_output", False)
    if capture:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(command, timeout=timeout, env=env, **kwargs) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _abort(process)
            stacks = err if isinstance(err, str) else (err or b"").decode()
            raise AssertionError(
                f"{_name(command)} did not end in {timeout:.0f} s; its "
                f"stderr's end, with its threads' stacks:\n{stacks[-8000:]}"
            ) from None
    result = subprocess.CompletedProcess(command, process.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def _abort(process):
    process.send_signal(signal.SIGABRT)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def _name(command):
    if isinstance(command, (list, tuple)):
        command = " ".join(str(part) for part in command)
    if command.startswith(sys.executable):
        command = "python" + command[len(sys.executable) :]
    return command[:200]
