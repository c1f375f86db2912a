"""The code a user copies first: the README's Python blocks and the example
at the top of each package's docstring run as written.

Each is taken from its document, so that an edit of the documentation (or
of an API it uses) that breaks it fails here.  The few names a snippet
leaves to the reader (``port``, ``data``, ``handle``...) are given to it;
the rest must come from its own imports.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xenback.sim import SimHost

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"no single README python block starts with {first_line!r}"
    return str(found[0])


def readme_commands(intro: str) -> list[str]:
    """The command lines of the README's indented block that follows the
    line ``intro``, their comments left out."""
    match = re.search(re.escape(intro) + r"\n\n((?:    .*\n)+)", README)
    assert match is not None, f"no indented block follows {intro!r} in the README"
    return [line.strip().split("  #")[0].strip() for line in match[1].splitlines()]


def docstring_example(module: str, name: str | None = None) -> str:
    """The first indented block of ``module``'s docstring (or that of
    ``module.name``), dedented."""
    obj = importlib.import_module(module)
    if name is not None:
        obj = getattr(obj, name)
    doc = inspect.getdoc(obj) or ""
    lines: list[str] = []
    for line in doc.splitlines():
        if line.startswith("    ") or (lines and not line.strip()):
            lines.append(line)
        elif lines:
            break
    assert lines, f"{module} {name or ''}'s docstring has no example"
    return textwrap.dedent("\n".join(lines))


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A host echo server's port: what the pvcalls snippets connect to."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # shut down: the test is over
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    # shutdown() wakes the accept(); close() alone would leave it waiting.
    server.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    server.close()


def run(code: str, **names: Any) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "snippet", **names}
    exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace


def test_readme_workqueue(capsys: pytest.CaptureFixture[str]) -> None:
    handled = threading.Event()
    ran = threading.Event()
    ns = run(readme_block("from workqueue import"),
             handle=lambda work: handled.set(), key="socket-1", f=ran.set)
    assert handled.is_set() and ran.is_set()
    assert ns["fut"].result(10) == 1024
    assert "workqueue events:" in capsys.readouterr().out


def test_readme_simulated_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing serves the snippet's console device: destroy_domain() waits
    # its 10 s for a backend to close it, as the README says.  A shorter
    # wait shows the same.
    destroy = SimHost.destroy_domain
    monkeypatch.setattr(SimHost, "destroy_domain",
                        lambda self, domain, timeout=0.2: destroy(self, domain, timeout))
    ns = run(readme_block("from xenback.sim import SimHost\n\nwith SimHost()"))
    assert ns["dev"].device_type == "console"
    assert ns["dev"].frontend_id == ns["guest"].domid == 1
    assert not ns["host"].run_dir.exists()  # "torn down on exit"


def test_readme_pvcalls(echo_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run(readme_block("from xenback.sim import SimHost\nimport pvcalls"),
             port=echo_port, data=b"ping")
    assert ns["s"].closed
    assert "BackendStats(" in capsys.readouterr().out


def test_workqueue_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    run(docstring_example("workqueue"))
    assert capsys.readouterr().out.startswith("ran <Work")


def test_xenback_sim_docstring() -> None:
    ns = run(docstring_example("xenback.sim"))
    assert ns["device"].device_type == "pvcalls"


def test_frontend_device_docstring(tmp_path: Path) -> None:
    from tests.scripts import load_script

    console = load_script(ROOT / "examples" / "console_backend.py", "console_backend")
    with SimHost() as host, console.ConsoleBackend(host.dom0, tmp_path):
        guest = host.create_domain("guest1")
        ns = run(docstring_example("xenback.sim._frontend"), guest=guest)
        assert host.toolstack.devices(guest.domid) == []  # closed, and removed
    assert repr(ns["fe"]) == "<FrontendDevice /local/domain/1/device/console/0 closed>"


def test_pvcalls_docstring(echo_port: int) -> None:
    ns = run(docstring_example("pvcalls"), port=echo_port)
    assert ns["s"].closed


def test_policy_docstring_holds_the_file_format() -> None:
    """help(pvcalls.Policy) is where a user of the public API finds the
    file format: its example is a policy that loads, meaning what its
    comments say (it was in the private pvcalls._policy's docstring)."""
    import pvcalls

    policy = pvcalls.Policy.from_toml(docstring_example("pvcalls", "Policy"))
    assert policy.max_sockets(3) == 256
    assert policy.max_sockets(7) == 16
    assert policy.connect_allowed(7, "192.0.2.1", 443)
    assert not policy.connect_allowed(7, "10.0.0.1", 22)
    assert policy.connect_allowed(9, "10.1.2.3", 443, name="webfront")
    assert not policy.connect_allowed(9, "10.2.0.1", 443, name="webfront")
    for doc in (pvcalls.__doc__, pvcalls.Policy.__doc__, pvcalls.Policy.from_file.__doc__):
        assert "_policy" not in (doc or "")


def test_pvcalls_frontend_docstring(echo_port: int) -> None:
    import pvcalls

    with SimHost() as host, pvcalls.Backend(host.dom0):
        guest = host.create_domain("guest1")
        ns = run(docstring_example("pvcalls.frontend"),
                 pvcalls=pvcalls, guest=guest, port=echo_port)
    assert ns["reply"] == b"hello"


def test_back_ring_docstring() -> None:
    from xenback import BackRing, FrontRing

    page = bytearray(4096)
    front = FrontRing(page, 8)
    for request in (b"ping----", b"pong----"):
        front.push_request(request)
    front.push_requests()
    notified = []
    run(docstring_example("xenback", "BackRing"), ring=BackRing(page, 8), handle=bytes.upper,
        notify=lambda: notified.append(True))
    assert list(front.responses()) == [b"PING----", b"PONG----"]
    assert notified == [True]


def test_backend_driver_docstring() -> None:
    from xenback import BackendDriver

    with SimHost() as host:
        ns = run(docstring_example("xenback", "BackendDriver"),
                 BackendDriver=BackendDriver, platform=host.dom0)
        assert ns["backend"].device_type == "console"
        # Started in the with block, and stopped at its end.
        assert not (host.run_dir / "xenback-console.dom0.lock").exists()


def test_device_work_docstring() -> None:
    from workqueue import alloc_workqueue
    from xenback import BackRing, DeviceWork

    ns = run(docstring_example("xenback", "DeviceWork"),
             DeviceWork=DeviceWork, BackRing=BackRing, SLOT_SIZE=64)
    dev = object()  # stored, used only to fail the device
    work = ns["Ring"](dev, bytearray(4096))
    assert work.dev is dev and work.ring.nr_ents == 32
    wq = alloc_workqueue("docstring")
    try:
        wq.queue_work(work)
        work.flush(timeout=10)
        assert wq.stats().failed == 0
    finally:
        wq.destroy()


def _lines(stream: Any) -> queue.Queue[str]:
    """``stream``'s lines as they come, to be waited for with a timeout."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line.decode())

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_until_served(port: int, timeout: float) -> None:
    """Wait for a host server to accept on ``port``: http.server says
    nothing when it listens (its stdout is a buffered pipe here)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_readme_by_hand_on_a_simulated_host(tmp_path: Path) -> None:
    """The three processes of "By hand", each command as written (in the
    environment that ``. .venv/bin/activate`` gives), but for the run
    directory and a port of the host's that is free."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    background: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for command in readme_commands("By hand, on a simulated host in separate processes:"):
            command = command.replace("/tmp/xs", str(tmp_path / "xs")).replace("8080", str(port))
            if not command.endswith("&"):
                done = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path,
                                      capture_output=True, timeout=60)
                assert done.returncode == 0, (command, done.stderr)
                assert done.stdout.startswith(b"HTTP/1.0 200 OK\r\n"), done.stdout
                break
            proc = subprocess.Popen(["bash", "-c", f"exec {command.removesuffix('&')}"],
                                    env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
            background.append((command, proc))
            if command.startswith("xenback-sim"):
                # What the README says to wait for before the others.
                lines = _lines(proc.stdout)
                while not lines.get(timeout=30).startswith("DOMAIN guest1 1"):
                    pass
            elif "http.server" in command:
                _wait_until_served(port, 30)
        else:
            raise AssertionError("no command of the block runs in the foreground")
    finally:
        for _, proc in reversed(background):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    # SIGTERM stops ours cleanly (http.server just dies of it).
    ours = [(command.split()[0], proc.returncode) for command, proc in background
            if "http.server" not in command]
    assert ours == [("xenback-sim", 0), ("pvcalls-backend", 0)]


_PUBLIC_APIS = ["pvcalls", "pvcalls.frontend", "xenback", "workqueue", "xenback.sim"]


def _public_docstrings(module: str) -> Iterator[tuple[str, str]]:
    """``(name, docstring)`` of ``module`` and of what it exports, as
    help() shows them: each class with its public methods and properties."""
    mod = importlib.import_module(module)
    yield module, mod.__doc__ or ""
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not isinstance(obj, type):
            yield f"{module}.{name}", getattr(obj, "__doc__", None) or "" if callable(obj) else ""
            continue
        yield f"{module}.{name}", obj.__doc__ or ""
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            yield f"{module}.{name}.{attr}", getattr(value, "__doc__", None) or ""


@pytest.mark.parametrize("module", _PUBLIC_APIS)
def test_every_export_is_documented(module: str) -> None:
    """A class or function by its own docstring; a constant, which has
    none, by a mention in the module's."""
    mod = importlib.import_module(module)
    undocumented = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        own = isinstance(obj, type) or inspect.isfunction(obj)
        if (own and obj.__doc__ is None) or (not own and f"``{name}``" not in (mod.__doc__ or "")
                                              and f":data:`{name}`" not in (mod.__doc__ or "")):
            undocumented.append(name)
    assert undocumented == []


@pytest.mark.parametrize("module", _PUBLIC_APIS)
def test_public_docstrings_point_to_nothing_private(module: str) -> None:
    """help() does not show a private method or class, so a docstring
    that sends its reader there ("see :meth:`_recv_nothing`") leaves them
    nowhere.  Private modules may be named: their help() is there."""
    exported = set()
    for mod in _PUBLIC_APIS:
        exported.update(importlib.import_module(mod).__all__)
    role = re.compile(r":(meth|class|func|attr|exc|data):`~?([\w.]+)`")
    private = []
    for where, doc in _public_docstrings(module):
        for kind, target in role.findall(doc):
            last = target.rsplit(".", 1)[-1]
            if last.startswith("_") and not last.startswith("__"):
                private.append((where, target))
            elif kind == "class" and "." not in target and target not in exported:
                if not hasattr(builtins, target):
                    private.append((where, target))
    assert private == []


def _has(obj: object, parts: list[str]) -> bool:
    try:
        for part in parts:
            obj = getattr(obj, part)
    except AttributeError:
        return False
    return True


def _resolves(target: str, *scopes: object) -> bool:
    """Whether the dotted ``target`` names something: from the longest
    importable module it starts with, else as an attribute path of one of
    ``scopes`` or of builtins."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return _has(module, parts[i:])
    return any(_has(scope, parts) for scope in (*scopes, builtins))


def _set_in_init(cls: type, attr: str) -> bool:
    """Whether some class of ``cls``'s MRO sets ``self.attr`` in its code:
    an instance attribute, which ``getattr(cls, attr)`` cannot find."""
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(attr)}\b\s*(?::[^=]+)?=", source):
            return True
    return False


@pytest.mark.parametrize("module", _PUBLIC_APIS)
def test_what_a_package_docstring_names_of_its_own_is_exported(module: str) -> None:
    """A name the package's docstring quotes as a literal and the package
    has (workqueue's ``TRACE_EVENTS``, say) is in its ``__all__``: what
    help() tells users to use must not be public by accident."""
    mod = importlib.import_module(module)
    named = re.findall(r"``([A-Za-z_]\w*)``", mod.__doc__ or "")
    exported = set(getattr(mod, "__all__", ()))
    assert [name for name in named if hasattr(mod, name) and name not in exported] == []


@pytest.mark.parametrize("module", _PUBLIC_APIS)
def test_public_docstrings_name_what_exists(module: str) -> None:
    """Every :meth:, :class:, :func:, :attr:, :exc:, :data: and :mod: of
    a public docstring names something that is there (from the module,
    the class it documents, the module that defines that, or an
    importable path): a rename must take the docstrings with it."""
    mod = importlib.import_module(module)
    role = re.compile(r":(?:meth|class|func|attr|exc|data|mod):`~?([\w.]+)`")
    dangling = []
    for where, doc in _public_docstrings(module):
        names = where.split(".")[len(module.split(".")):]
        owner = getattr(mod, names[0]) if names else None
        home = inspect.getmodule(owner) if owner is not None else None
        scopes = [scope for scope in (mod, owner, home) if scope is not None]
        for target in role.findall(doc):
            if _resolves(target, *scopes):
                continue
            if isinstance(owner, type) and "." not in target and _set_in_init(owner, target):
                continue
            dangling.append((where, target))
    assert dangling == []


@pytest.mark.parametrize("module", _PUBLIC_APIS)
def test_documented_numeric_defaults_are_the_code_s(module: str) -> None:
    """A docstring's "``name`` ... (default N" for a parameter of the
    function (or class) it documents says the default its signature has."""
    mod = importlib.import_module(module)
    wrong = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        targets = [(name, obj)]
        if isinstance(obj, type):
            targets += [(f"{name}.{attr}", value) for attr, value in vars(obj).items()
                        if callable(value) and not attr.startswith("_")]
        for where, func in targets:
            try:
                params = inspect.signature(func).parameters
            except (TypeError, ValueError):
                continue
            doc = inspect.getdoc(func) or ""
            if isinstance(func, type):
                doc += "\n" + (func.__init__.__doc__ or "")
            for param, spec in params.items():
                others = [f"``{other}``" for other in params if other != param]
                said = re.finditer(rf"``{param}``([^;]*?)\bdefault:? (-?\d[\d.]*\d|\d)", doc, re.S)
                for match in said:
                    if "\n\n" in match[1] or any(other in match[1] for other in others):
                        continue
                    if float(match[2]) != spec.default:
                        wrong.append((where, param, match[2], spec.default))
    assert wrong == []


@pytest.mark.parametrize("module", _PUBLIC_APIS)
def test_a_constant_s_value_in_its_module_docstring_is_its_own(module: str) -> None:
    # "``DEFAULT_MAX_IOWORKERS`` (64)", "``PAGE_SIZE``: 4096".
    mod = importlib.import_module(module)
    said = re.findall(r"``(\w+)``(?: \(|: )(\d+)(?=[,;.)]|\s*$)", mod.__doc__ or "")
    wrong = [(name, value) for name, value in said
             if name in mod.__all__ and getattr(mod, name) != int(value)]
    assert wrong == []


def _readme_names() -> set[str]:
    """The README's backquoted Python names: ``pkg.module.name``, with or
    without a call's parentheses, and ``Class.attribute``."""
    names = set()
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    for quoted in re.findall(r"`([^`]+)`", prose):  # a code span may go over a line's end
        match = re.fullmatch(r"((?:workqueue|xenback|pvcalls)(?:\.\w+)+|[A-Z]\w*\.\w+)"
                             r"(?:\(.*\))?", quoted)
        if match:
            names.add(match[1])
    return names


def test_the_readme_names_what_exists() -> None:
    from concurrent.futures import Future

    from xenback.sim._xenstored import XenStored

    scope: dict[str, object] = {"Future": Future, "XenStored": XenStored}
    for module in _PUBLIC_APIS:
        mod = importlib.import_module(module)
        scope.update((name, getattr(mod, name)) for name in mod.__all__)
    names = _readme_names()
    assert {"xenback.ring.mb", "HostLock.for_domain", "XenStored.max_queued"} <= names
    missing = []
    for name in sorted(names):
        first, _, rest = name.partition(".")
        if first in scope:
            owner = scope[first]
            found = _resolves(rest, owner) or (
                isinstance(owner, type) and _set_in_init(owner, rest))
        else:
            found = _resolves(name)
        if not found:
            missing.append(name)
    assert missing == []


def test_the_readme_s_files_exist() -> None:
    paths = set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|sh|service|toml))`", README))
    paths.update(re.findall(r"`((?:examples|tools|tests|bench|contrib)/[\w./-]*)`", README))
    assert "examples/console_backend.py" in paths
    # What a run makes (git-ignored: tests/realxen/cache/) need not be there.
    ignored = (ROOT / ".gitignore").read_text().split()
    missing = sorted(path for path in paths if "<" not in path and path not in ignored
                     and not (ROOT / path).exists())
    assert missing == []


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_says_how_to_run_it_and_a_test_runs_it(example: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "examples" / example).read_text())) or ""
    assert f".venv/bin/python examples/{example}" in doc
    tests = [path for path in (ROOT / "tests").rglob("test_*.py") if example in path.read_text()]
    assert tests, f"no test names examples/{example}"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_answers_help_and_refuses_what_it_does_not_know(example: str) -> None:
    # Four ignored their arguments: --help ran the example (a host, a
    # backend, threads) instead.  Help is said before anything starts, so
    # it is all the output; an unknown option is a usage error.
    script = str(ROOT / "examples" / example)
    doc = ast.get_docstring(ast.parse(Path(script).read_text())) or ""
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert (helped.returncode, helped.stderr) == (0, "")
    assert helped.stdout.startswith(f"usage: {example} [-h]")
    assert " ".join(doc.splitlines()[0].split()) in " ".join(helped.stdout.split())
    wrong = subprocess.run([sys.executable, script, "--no-such-option"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert (wrong.returncode, wrong.stdout) == (2, "")
    assert wrong.stderr.startswith(f"usage: {example} ")
    assert wrong.stderr.rstrip().endswith("error: unrecognized arguments: --no-such-option")


@pytest.mark.parametrize("tool", ["wq_model_campaign.py", "wq_race_campaign.py"])
def test_campaign_tools_explain_their_arguments(tool: str) -> None:
    # The README gives them numbers by position: --help must say what they
    # are, and a wrong one must be a usage error, not a traceback.
    script = str(ROOT / "tools" / tool)
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert helped.returncode == 0, helped.stderr
    assert "seed" in helped.stdout and "default" in helped.stdout
    wrong = subprocess.run([sys.executable, script, "many"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert wrong.returncode == 2
    assert "'many' is not a whole number of 1 or more" in wrong.stderr
    assert "Traceback" not in wrong.stderr


@pytest.mark.parametrize(("tool", "args", "message"), [
    ("tools/wq_model_campaign.py", ["-5"],
     "argument examples: -5 is not a whole number of 1 or more"),
    ("tools/wq_model_campaign.py", ["10", "0"],
     "argument steps: 0 is not a whole number of 1 or more"),
    ("tools/wq_race_campaign.py", ["0"], "argument rounds: 0 is not a whole number of 1 or more"),
    ("tests/pvcalls/pvcalls_fuzz.py", ["--seeds", "x"],
     "argument --seeds: 'x' is not a seed or a range of seeds (N or N-M)"),
    ("tests/pvcalls/pvcalls_fuzz.py", ["--seeds", "5-1"],
     "argument --seeds: 5-1 ends before it starts"),
    ("tests/pvcalls/pvcalls_fuzz.py", ["--steps", "-1"],
     "argument --steps: -1 is not a whole number of 1 or more"),
    ("tests/pvcalls/pvcalls_fuzz.py", ["--cpus", "0"],
     "argument --cpus: 0 is not a whole number of 1 or more"),
    ("tests/xenback/xenbus_fuzz.py", ["--seeds", "1-"],
     "argument --seeds: '1-' is not a seed or a range of seeds (N or N-M)"),
    ("tests/xenback/xenbus_fuzz.py", ["--steps", "0"],
     "argument --steps: 0 is not a whole number of 1 or more"),
    ("tests/xenback/xenbus_fuzz.py", ["--guests", "many"],
     "argument --guests: 'many' is not a whole number of 1 or more"),
], ids=["examples", "steps", "rounds", "seeds", "seed-range", "fuzz-steps", "cpus",
        "open-range", "xenbus-steps", "guests"])
def test_the_readme_s_campaign_tools_refuse_numbers_they_cannot_run(
        tool: str, args: list[str], message: str) -> None:
    # Each was a traceback (int(), hypothesis' own check) or an empty run
    # that reported success ("0 of 0 seeds failed", "-1 steps each").
    run = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.rstrip().endswith(message)
    assert "Traceback" not in run.stderr


def test_the_campaign_tools_take_their_least_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The refusals above must not reach the numbers the tools can run: one
    # round, one step, seed 0, a range of one seed.
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    toolargs = importlib.import_module("toolargs")
    assert (toolargs.whole(1)("1"), toolargs.whole(0)("0")) == (1, 0)
    assert toolargs.seed_range("0") == range(0, 1)
    assert toolargs.seed_range("3-3") == range(3, 4)


@pytest.mark.parametrize("fuzzer", ["tests/pvcalls/pvcalls_fuzz.py",
                                    "tests/xenback/xenbus_fuzz.py"])
def test_the_fuzzers_run_as_the_readme_says(fuzzer: str) -> None:
    # Scripts, not tests: nothing else runs them as the README does.  One
    # ran into another directory's conftest (its EchoServer's old home).
    assert f"python {fuzzer} --seeds" in " ".join(README.split())
    run = subprocess.run([sys.executable, fuzzer, "--seeds", "3-3", "--steps", "20"],
                         capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "0 of 1 seeds failed" in run.stdout + run.stderr
