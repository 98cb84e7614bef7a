"""Launch the real `tritonserver` bundled in the nvidia-pytriton 0.7.0 wheel (tritonserver
2.51.0 with the python backend and the ensemble scheduler; it runs on CPU).

What a direct launch needs, each seen failing without it: a backend directory whose `python/` holds symlinks
(not copies: the stub finds its bundled libraries next to its real location) to the python backend and to the
stub for the running Python version; the interpreter's `bin/` first on PATH (the stub finds its packages through
`python3`); LD_LIBRARY_PATH starting with the interpreter's LIBDIR (or the stub may load another libpython).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """tritonserver could not be found, did not start, or did not become ready in time."""


def pytriton_root() -> Path:
    """The `tritonserver/` folder inside the installed nvidia-pytriton package."""
    try:
        import pytriton
    except ImportError:
        raise ServerError("nvidia-pytriton is not installed; run `make setup` (it bundles tritonserver)") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {root}")
    return root


def make_backend_dir(dest: Path) -> Path:
    """A backend directory for the bundled python backend, built from symlinks to the installed files."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {version} ({stub})")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for target in (root / "backends/python/libtriton_python.so",
                   root / "backends/python/triton_python_backend_utils.py", stub):
        link = python_dir / target.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return dest


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: this interpreter's bin/ first on PATH, its LIBDIR first on LD_LIBRARY_PATH,
    idle OpenMP threads passive."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + [p for p in ld if p != libdir])
    # The generator loads its model on one thread and runs it on another; idle OpenMP workers that spin-wait
    # take the cores that thread needs (measured on 2 cores: a 1-token request took 0.58 s spinning, 0.004 s
    # passive; bench/common.py). A value the user set is kept.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


# What the generator logs before it ends its own process (steerlm.serve.generator.Watchdog).
STALL_MARK = "steerlm generator stalled:"


def port_in_use(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


def load_failure(log_text: str) -> str | None:
    """One line naming the model that failed to load and why, from a tritonserver log (None if none did)."""
    for line in log_text.splitlines():
        m = re.search(r"failed to load '([^']+)' version \d+: (.*)", line)
        if m:
            return f"model '{m.group(1)}' failed to load: {m.group(2).strip()}"
    return None


def process_children(pid: int) -> dict[int, str]:
    """Direct child processes of `pid` (Linux /proc) and their command lines."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls, http: int = 0, grpc: int = 0, metrics: int = 0) -> "Ports":
        """0 means: any free loopback port."""
        return cls(http or free_port(), grpc or free_port(), metrics or free_port())


def tritonserver_command(repo_dir: Path, backend_dir: Path, ports: Ports, address: str = "127.0.0.1",
                         extra: list[str] | None = None) -> list[str]:
    root = pytriton_root()
    return [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repo_dir}",
        f"--backend-directory={backend_dir}",
        f"--cache-directory={root / 'caches'}",
        f"--http-address={address}", f"--http-port={ports.http}",
        f"--grpc-address={address}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={address}", f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--log-verbose=0",
        *(extra or []),
    ]


def shell_line(cmd: list[str]) -> str:
    """The command as one copy-pasteable shell line, with the environment `server_env` sets."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    prefix = (f"PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\" "
              f"LD_LIBRARY_PATH={shlex.quote(libdir)}:\"$LD_LIBRARY_PATH\" ")
    return prefix + " ".join(shlex.quote(c) for c in cmd)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent goes away (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonServer:
    """A real tritonserver on loopback, serving a rendered model repository.

    Use as a context manager; ports given as 0 are picked free. Ready means `/v2/health/ready` answered 200;
    a server that does not get there within `timeout` seconds is stopped and its log tail raised.

    `TritonServer(model_dir, reward_model_dir=None)` renders the SteerLM repository for the CPU backend first;
    pass `repo_dir=` (an already rendered repository) to serve that instead. Attributes: http_url, grpc_url
    (host:port, as tritonclient takes them), metrics_url, log_path, process.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        reward_model_dir: str | os.PathLike | None = None,
        *,
        repo_dir: str | os.PathLike | None = None,
        workdir: str | os.PathLike | None = None,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        timeout: float = 120.0,
        log_file: str | os.PathLike | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        if (repo_dir is None) == (model_dir is None and reward_model_dir is None):
            raise ValueError("give model_dir and/or reward_model_dir (rendered for the CPU backend), or repo_dir")
        # The work directory holds the python backend links and the log (and the repository if rendered here);
        # a temporary one is removed by cleanup(), one given by the caller is kept.
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="steerlm-triton-") if workdir is None else workdir).resolve()
        if repo_dir is None:
            from steerlm.serve.repository import render_repository

            repo_dir = render_repository(self.workdir / "models", model_dir, reward_model_dir, backend="cpu")
        self.repo_dir = Path(repo_dir).resolve()
        self.backend_dir = make_backend_dir(self.workdir / "backends")
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.ports = Ports.pick(*self._requested_ports)
        self.timeout = timeout
        self.log_path = Path(log_file) if log_file else self.workdir / "tritonserver.log"
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self.stub_pids: dict[int, str] = {}  # python backend stub processes (PID -> model) once ready

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        return tritonserver_command(self.repo_dir, self.backend_dir, self.ports, extra=self.extra_args)

    def start(self) -> "TritonServer":
        for name, port in zip(("HTTP", "gRPC", "metrics"), self._requested_ports):
            if port and port_in_use(port):
                raise ServerError(f"{name} port {port} is already in use on 127.0.0.1; choose another "
                                  f"(--{name.lower()}-port, or 0 for any free port)")
        # A port picked free can be taken by someone else before tritonserver binds it: pick again then.
        for attempt in range(3):
            try:
                self._start_once()
                return self
            except ServerError as exc:
                self.stop()
                taken = "already in use" in str(exc) or "Address in use" in str(exc)
                if not (taken and 0 in self._requested_ports and attempt < 2):
                    raise
                self.ports = Ports.pick(*self._requested_ports)
            except BaseException:
                self.stop()
                raise
        return self

    def _start_once(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            # A new session, so that Ctrl-C in a terminal reaches us and we stop the server ourselves;
            # and the server dies with the thread that started it, should that be killed before stop().
            self.process = subprocess.Popen(self.command(), env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                cause = load_failure(self._log_text())
                if cause:
                    raise ServerError(f"{cause} (log: {self.log_path})")
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            # Only once our server says it listens: another server on the port would answer the probe too.
            if f"Started HTTPService at {self.http_url}" not in self._log_text():
                time.sleep(0.2)
                continue
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        self.stub_pids = self._stubs()
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.timeout:.0f} s:\n{self.log_tail()}")

    def _stubs(self) -> dict[int, str]:
        stubs = {}
        for pid, cmd in process_children(self.process.pid).items():
            m = re.search(r"triton_python_backend_stub \S*?/([^/ ]+)/\d+/model\.py", cmd)
            if m:
                stubs[pid] = m.group(1)
        return stubs

    def check_health(self) -> str | None:
        """Why the server can no longer answer (tritonserver exited, or a model's process died), or None.

        Triton keeps reporting ready after a python model's process dies (every request to it then fails), so
        the stub processes are watched here."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            return f"tritonserver exited (code {code}); log: {self.log_path}"
        for pid, model in self.stub_pids.items():
            if not _alive(pid):
                said = [line for line in self._log_text().splitlines() if STALL_MARK in line]
                cause = f" ({said[-1].split(STALL_MARK, 1)[1].strip()})" if said else " (killed or crashed)"
                return f"the process of model '{model}' (PID {pid}) died{cause}; log: {self.log_path}"
        return None

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self._log_text().splitlines()[-lines:]) or "(no server log)"

    def stop(self, grace: float = 15.0) -> None:
        """Stop the server by its PID: SIGTERM (Triton unloads models), then SIGKILL after `grace` seconds."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                # The python backend stubs are in the server's process group; take them down with it.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def cleanup(self) -> None:
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()
