"""Commands and signals the operator granted by name
(``[grants] commands = { check = ["/usr/sbin/nginx", "-t", "-c", "{file}"] }``,
``[grants] signals = { nginx = "/run/nginx.pid" }``). A plugin names an
entry; it never chooses the argv, environment or working directory.
``file``, a path inside the plugin's ``files`` grant, replaces ``{file}``
in the granted argv by its absolute path."""

from typing import Optional

from wit_world.imports import commands as _host

from . import HostError, _call

__all__ = ["RunResult", "run", "check", "trigger", "signal"]

#: How a command run ended: ``exit_code`` (``None`` when it was killed),
#: ``timed_out``, ``stdout_tail`` and ``stderr_tail`` (the last 4 KiB of
#: each) and ``duration_ms``.
RunResult = _host.RunResult


def run(name: str, file: Optional[str] = None) -> RunResult:
    """Run command ``name`` and wait for it to end, at most its timeout and
    the call's deadline. A command that fails is a result, not an error;
    raises :class:`watchgate.HostError` when ``name`` is not granted or the
    command cannot be started."""
    return _call(_host.run, name, file)


def check(name: str, file: Optional[str] = None) -> RunResult:
    """:func:`run`, raising :class:`watchgate.HostError` unless the command
    exited 0: its message names the command, how it ended and the end of
    its standard error (a rendered file that fails its check fails the
    event, and the file is not put in place)."""
    result = run(name, file)
    if result.exit_code != 0:
        if result.timed_out:
            how = "timed out"
        elif result.exit_code is None:
            how = "was killed"
        else:
            how = f"exited {result.exit_code}"
        tail = result.stderr_tail.strip() or result.stdout_tail.strip()
        raise HostError(f"command {name!r} {how}" + (f": {tail}" if tail else ""))
    return result


def trigger(name: str, file: Optional[str] = None) -> None:
    """Start command ``name`` in the background (a reload) and return at
    once. Asked again while it runs, it runs once more after it ends.
    Raises :class:`watchgate.HostError` when ``name`` is not granted."""
    _call(_host.trigger, name, file)


def signal(name: str) -> None:
    """Send SIGHUP to the process whose id is in the pid file granted as
    ``name``. Raises :class:`watchgate.HostError` with the host's reason."""
    _call(_host.signal, name)
