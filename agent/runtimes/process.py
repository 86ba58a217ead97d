"""Model servers as local process groups that outlive an agent restart.

Each server runs in a session of its own (``start_new_session``), so one signal to
its process group reaches the workers it spawned, and nothing the agent does to its
own terminal or group reaches the server. Its output goes to a file, not a pipe: a
pipe would break (SIGPIPE) when the agent exits, and the server must survive that
to be adopted by the next agent.

What the next agent needs to find it again lives in ``<state_dir>/pids/<model>.json``:
the pid, the process start time and the boot id (``agent.processes``), so that a pid the
kernel has since given to another process is never mistaken for the server. Output is
in ``<state_dir>/logs/<model>.log``, with the run it holds marked beside it
(``runtimes/log_file.py``). Every file and ``/proc`` read runs off the event loop.

Nothing here goes through a shell: argv is executed as given, after macro expansion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agent import processes
from agent.catalog import ModelSpec
from agent.log_lines import LogCursor, LogRead
from agent.runtimes.base import ExitStatus, Instance, RuntimeFailure
from agent.runtimes.log_file import LogFile
from shared.topics import is_model_name

# logs() (error reports) reads at most this much of the end of a log, however large it has
# grown; read_log() (the logs command) reads what one reply can carry.
LOG_TAIL_BYTES = 64 * 1024
# How often stop() looks whether the group leader has gone (one small /proc read).
LEADER_POLL_S = 0.05
# How often stop() looks for what is left of the group (a scan of all of /proc).
GROUP_POLL_S = 0.1
# How long a group may take to disappear after SIGKILL (a process stuck in the GPU
# driver can take a while) before stop() reports it as unkillable.
KILL_WAIT_S = 5.0
# How long to wait for the event loop to collect a child that has already exited.
REAP_WAIT_S = 2.0
# The agent's own secrets: model servers run third-party code and never need them.
PRIVATE_ENV = frozenset({"MODELBUS_BROKER_PASSWORD"})


def _describe(returncode: int) -> ExitStatus:
    if returncode >= 0:
        return ExitStatus(returncode, f"exited with code {returncode}")
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return ExitStatus(returncode, f"killed by {name}")


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[name]
    except KeyError:
        return signal.SIGTERM


# ---- bookkeeping ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PidRecord:
    """What a pid file says."""

    pid: int
    start_time: float | None  # when the process started, as agent.processes reads it
    boot_id: str | None
    started_at: float  # when the agent launched it

    @classmethod
    def parse(cls, text: str) -> _PidRecord | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        pid, start_time = data.get("pid"), data.get("start_time")
        boot_id, started_at = data.get("boot_id"), data.get("started_at", 0.0)
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        ticks = data.get("start_ticks")  # what pid files of earlier versions recorded
        if start_time is None and _is_number(ticks) and isinstance(ticks, int):
            start_time = processes.ticks_to_start_time(ticks)
        if start_time is not None and not _is_number(start_time):
            return None
        if boot_id is not None and not isinstance(boot_id, str):
            return None
        if not _is_number(started_at):
            return None
        return cls(pid, start_time, boot_id, float(started_at))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(slots=True)
class _Tracked:
    """A server this runtime knows: started here (``process`` set) or adopted."""

    model: str
    pid: int
    start_time: float | None
    process: asyncio.subprocess.Process | None = None

    async def leader_running(self) -> bool:
        if self.process is not None:
            # Our own child: the event loop collects it the moment it ends.
            return self.process.returncode is None
        return await asyncio.to_thread(processes.is_running, self.pid, self.start_time)

    async def owns_group(self) -> bool:
        """False once the leader's pid belongs to another process. While any member of
        the group is left, the kernel does not reuse its id, so with the leader gone
        whatever still carries that group id is ours."""
        if self.start_time is None:
            return True
        now = await asyncio.to_thread(processes.start_time, self.pid)
        return now is None or processes.same_start(now, self.start_time)


# ---- the runtime -----------------------------------------------------------------


class ProcessRuntime:
    """Runs each model server as a local process group (see the module docstring)."""

    name: str = "process"
    listens_itself: bool = True

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._pid_dir = state_dir / "pids"
        self._log_dir = state_dir / "logs"
        self._boot_id = processes.boot_id()
        self._tracked: dict[int, _Tracked] = {}

    # -- Runtime protocol --

    async def start(self, spec: ModelSpec, extra_env: dict[str, str]) -> Instance:
        launch = spec.process
        if launch is None:
            raise RuntimeFailure(
                f"{spec.name} has no 'process:' block, so the process runtime cannot start it"
            )
        pid_path, log = self._pid_path(spec.name), self._log_file(spec.name)
        previous = await asyncio.to_thread(self._read_pid_file, spec.name)
        if previous is not None and await asyncio.to_thread(self._is_current, previous):
            raise RuntimeFailure(
                f"{spec.name} is already running as pid {previous.pid}; stop it before "
                "starting it again"
            )
        argv = [spec.expand(arg) for arg in launch.argv]
        cwd = Path(spec.expand(str(launch.cwd))) if launch.cwd is not None else None
        if cwd is not None and not await asyncio.to_thread(cwd.is_dir):
            raise RuntimeFailure(
                f"cannot start {spec.name}: its working directory {cwd} does not exist "
                "(process.cwd in the catalog)"
            )
        try:
            log_fd = await asyncio.to_thread(self._open_log, log)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot start {spec.name}: cannot write its log under {self.state_dir} "
                f"({exc.strerror})"
            ) from None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                env=self._environment(spec, extra_env),
                cwd=cwd,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise RuntimeFailure(
                f"cannot start {spec.name}: executable {argv[0]!r} was not found "
                "(check process.argv[0] in the catalog and PATH)"
            ) from None
        except PermissionError:
            raise RuntimeFailure(
                f"cannot start {spec.name}: {argv[0]!r} is not executable "
                "(check its permissions or process.argv[0] in the catalog)"
            ) from None
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot start {spec.name}: running {argv[0]!r} failed ({exc.strerror})"
            ) from None
        finally:
            os.close(log_fd)

        pid = process.pid
        started = await asyncio.to_thread(processes.start_time, pid)
        tracked = _Tracked(spec.name, pid, started, process)
        self._forget(spec.name)
        self._tracked[pid] = tracked
        started_at = time.time()
        record = {
            "model": spec.name,
            "pid": pid,
            "start_time": tracked.start_time,
            "boot_id": self._boot_id,
            "argv": argv,
            "started_at": started_at,
        }
        try:
            await asyncio.to_thread(
                self._write_atomically, pid_path, json.dumps(record, indent=2) + "\n"
            )
        except OSError as exc:
            # Without a pid file a restarted agent would never find it again, and its
            # VRAM would be held by no one the agent knows: better not to run it.
            await self._terminate(tracked, 0.0)
            self._tracked.pop(pid, None)
            raise RuntimeFailure(
                f"cannot start {spec.name}: cannot write its pid file {pid_path} ({exc.strerror})"
            ) from None
        return Instance(
            model=spec.name,
            runtime=self.name,
            pid=pid,
            started_at=started_at,
            pids=frozenset({pid}),
            stop_signal=spec.stop_signal,
        )

    async def stop(self, instance: Instance, timeout_s: float) -> None:
        if instance.pid is None:
            return
        tracked = await self._tracking(instance)
        await self._terminate(tracked, timeout_s, _signal(instance.stop_signal))
        # Still tracked, so that exit_status() can tell how it ended; start() forgets it.
        await asyncio.to_thread(self._remove_pid_file, instance.model, tracked.pid)

    async def exit_status(self, instance: Instance) -> ExitStatus | None:
        if instance.pid is None:
            return ExitStatus(None, "process ended (no pid was recorded)")
        tracked = await self._tracking(instance)
        process = tracked.process
        if await tracked.leader_running():
            return None
        if process is None:
            return ExitStatus(
                None, "process ended (exit code unknown: adopted after an agent restart)"
            )
        await self._reap(tracked)
        if process.returncode is None:
            return ExitStatus(None, "process ended (exit code unknown)")
        return _describe(process.returncode)

    async def logs(self, instance: Instance, lines: int = 20) -> list[str]:
        if lines <= 0 or not is_model_name(instance.model):
            return []
        log = self._log_file(instance.model)
        return await asyncio.to_thread(log.tail, lines, LOG_TAIL_BYTES)

    async def read_log(
        self, spec: ModelSpec, since: LogCursor | None, lines: int, *, live: bool
    ) -> LogRead:
        log = self._log_file(spec.name)
        return await asyncio.to_thread(log.read, since, lines, complete=not live)

    async def adopt(self, specs: dict[str, ModelSpec]) -> list[Instance]:
        adopted: list[Instance] = []
        for model in sorted(specs):
            if not is_model_name(model):
                continue
            record = await asyncio.to_thread(self._current_pid_file, model)
            if record is None:
                continue
            known = self._tracked.get(record.pid)
            if known is None or known.model != model:
                self._forget(model)
                self._tracked[record.pid] = _Tracked(model, record.pid, record.start_time)
            group = await asyncio.to_thread(processes.members, record.pid)
            adopted.append(
                Instance(
                    model=model,
                    runtime=self.name,
                    pid=record.pid,
                    started_at=record.started_at,
                    pids=group | {record.pid},
                    stop_signal=specs[model].stop_signal,
                )
            )
        return adopted

    async def pids(self, instance: Instance) -> frozenset[int]:
        if instance.pid is None or not await (await self._tracking(instance)).owns_group():
            return frozenset()
        return await asyncio.to_thread(processes.members, instance.pid)

    def _forget(self, model: str) -> None:
        """Drop earlier servers of ``model`` (ended: start() refuses a running one)."""
        for pid in [pid for pid, known in self._tracked.items() if known.model == model]:
            del self._tracked[pid]

    # -- stopping --

    async def _terminate(
        self, tracked: _Tracked, timeout_s: float, stop_signal: signal.Signals = signal.SIGTERM
    ) -> None:
        """Signal the group (SIGTERM unless the model asks otherwise), give it ``timeout_s``
        to go, then SIGKILL what is left."""
        if not await tracked.owns_group():
            return
        self._signal_group(tracked, stop_signal)
        deadline = time.monotonic() + max(0.0, timeout_s)
        leader_gone = await self._wait_leader(tracked, deadline)
        left = await asyncio.to_thread(processes.members, tracked.pid)
        # The leader went in time: give its workers the rest of the time to follow it.
        while leader_gone and left and time.monotonic() < deadline:
            await asyncio.sleep(GROUP_POLL_S)
            left = await asyncio.to_thread(processes.members, tracked.pid)
        if leader_gone and not left:
            await self._reap(tracked)
            return
        if not await tracked.owns_group():
            return
        self._signal_group(tracked, signal.SIGKILL)
        # Members that moved to a group of their own are still in the session.
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + KILL_WAIT_S
        leader_gone = await self._wait_leader(tracked, kill_deadline)
        left = await asyncio.to_thread(processes.members, tracked.pid)
        while left and time.monotonic() < kill_deadline:
            await asyncio.sleep(GROUP_POLL_S)
            left = await asyncio.to_thread(processes.members, tracked.pid)
        await self._reap(tracked)
        if not leader_gone or left:
            raise RuntimeFailure(
                f"{tracked.model} (pid {tracked.pid}) is still running {KILL_WAIT_S:g} s after "
                "SIGKILL; it may be stuck in the GPU driver"
            )

    def _signal_group(self, tracked: _Tracked, sig: signal.Signals) -> None:
        try:
            os.killpg(tracked.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already
        except PermissionError:
            raise RuntimeFailure(
                f"not allowed to signal {tracked.model}'s processes (group {tracked.pid}); "
                "is it running as another user?"
            ) from None

    async def _wait_leader(self, tracked: _Tracked, deadline: float) -> bool:
        """Whether the group leader ended before ``deadline``. Our own child is awaited
        (no polling delay: a swap waits on this); an adopted one is polled."""
        process = tracked.process
        if process is not None and process.returncode is None:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.shield(process.wait())
        while await tracked.leader_running():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(LEADER_POLL_S, remaining))
        return True

    async def _reap(self, tracked: _Tracked) -> None:
        """Let the event loop collect our own child (no zombie, a known exit code)."""
        if tracked.process is not None and tracked.process.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REAP_WAIT_S):
                    await tracked.process.wait()

    # -- files --

    def _pid_path(self, model: str) -> Path:
        if not is_model_name(model):
            raise RuntimeFailure(f"{model!r} is not a valid model name")
        return self._pid_dir / f"{model}.json"

    def _log_file(self, model: str) -> LogFile:
        if not is_model_name(model):
            raise RuntimeFailure(f"{model!r} is not a valid model name")
        return LogFile(self._log_dir / f"{model}.log")

    def _open_log(self, log: LogFile) -> int:
        self._pid_dir.mkdir(parents=True, exist_ok=True)
        return log.begin_run()

    def _current_pid_file(self, model: str) -> _PidRecord | None:
        """The pid file of a server of ``model`` that runs now; a stale one is removed."""
        path = self._pid_path(model)
        if not path.exists():
            return None
        record = self._read_pid_file(model)
        if record is None or not self._is_current(record):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return record

    def _read_pid_file(self, model: str) -> _PidRecord | None:
        try:
            text = self._pid_path(model).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return _PidRecord.parse(text)

    def _remove_pid_file(self, model: str, pid: int) -> None:
        """Remove it unless it already describes a newer server of the same model."""
        if not is_model_name(model):
            return
        record = self._read_pid_file(model)
        if record is None or record.pid == pid:
            with contextlib.suppress(FileNotFoundError):
                self._pid_path(model).unlink()

    @staticmethod
    def _write_atomically(path: Path, text: str) -> None:
        # No fsync: a pid file only has to survive the agent, not the host.
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)

    def _is_current(self, record: _PidRecord) -> bool:
        """Whether the pid file describes a process that is running now."""
        if record.start_time is None:
            return False  # cannot tell it from whatever got the pid since
        if record.boot_id and self._boot_id and record.boot_id != self._boot_id:
            return False
        return processes.is_running(record.pid, record.start_time)

    async def _tracking(self, instance: Instance) -> _Tracked:
        assert instance.pid is not None
        known = self._tracked.get(instance.pid)
        if known is not None and known.model == instance.model:
            return known
        # Not started or adopted by this runtime object: the pid file still guards
        # against pid reuse when it names the same pid.
        record = (
            await asyncio.to_thread(self._read_pid_file, instance.model)
            if is_model_name(instance.model)
            else None
        )
        started = record.start_time if record is not None and record.pid == instance.pid else None
        return _Tracked(instance.model, instance.pid, started)

    # -- environment --

    @staticmethod
    def _environment(spec: ModelSpec, extra_env: dict[str, str]) -> dict[str, str]:
        assert spec.process is not None
        env = {key: value for key, value in os.environ.items() if key not in PRIVATE_ENV}
        # CUDA numbers GPUs fastest first unless told otherwise; the agent's indexes are
        # NVML's, which follow the PCI bus. A spec may still choose otherwise.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env.update({key: spec.expand(value) for key, value in spec.process.env.items()})
        env.update(extra_env)
        gpus = ",".join(map(str, spec.gpus))
        env.update(
            CUDA_VISIBLE_DEVICES=gpus,
            MODELBUS_MODEL=spec.name,
            MODELBUS_PORT=str(spec.port),
            MODELBUS_GPUS=gpus,
        )
        return env
