"""The control channel trusts nothing it finds: a link in a run dir may lead to a copy's original, to another
user's process or to a fake; a request line may be built to blow the stack; the socket dir may be someone's
trap. Real sockets, real training threads, the real CLI entry point (issue 20, items 2, 6 and 10)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides
from support.waiting import wait_for
from test_control import Live, Recorder, raw, read_lines, replies
from test_control import live as live_fixture  # noqa: F401 (a fixture, registered under this name)

from tui_trainer.cli import main
from tui_trainer.control.client import ControlClient
from tui_trainer.control.protocol import LINK_NAME, MAX_DEPTH, PROTOCOL, find_socket
from tui_trainer.control.server import ControlServer
from tui_trainer.core.config import load_config
from tui_trainer.core.errors import ChannelRefused
from tui_trainer.core.events import State, StateChanged
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore, read_run_id
from tui_trainer.engine.trainer import Trainer


@pytest.fixture
def live(live_fixture: Callable[..., Live]) -> Callable[..., Live]:  # noqa: F811
    """test_control's `live`: a real Trainer on its own thread serving its socket (tmp_path/runs)."""
    return live_fixture


def fake_hello(run_dir: Path, step: int, pid: int) -> dict[str, Any]:
    """The hello a real server of run p would send: a fake one must pass every check but the one tested."""
    status = {"run": "p", "state": "Running", "step": step, "max_steps": None, "loss": None, "eval_loss": None}
    status |= {"tokens_per_s": None, "last_checkpoint": None, "failure": None, "pid": pid}
    return {
        "hello": "tui-trainer",
        "protocol": PROTOCOL,
        "version": "0.1.0",
        "run": "p",
        "run_id": read_run_id(run_dir),
        "run_dir": str(run_dir.resolve()),
        "pid": pid,
        "status": status,
    }


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI's entry point in this process (its sockets and threads are real): (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("tui-trainer: error: "), err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- item 2: a copied run dir


def test_a_copied_live_run_neither_steers_nor_is_steered_by_the_original(live, capsys):
    run = live()
    store = run.store
    with run.client() as client:
        assert client.request("save")["ok"]
    wait_for(lambda: store.run("r").newest is not None, 60, "the saved checkpoint")
    shutil.copytree(run.run_dir, store.run_dir("copy"), symlinks=True, ignore=shutil.ignore_patterns(".metrics-cache"))
    assert find_socket(store.run_dir("copy")) == run.server.path  # the copied link leads to the original
    # the original is no process of the copy's: the copy is not running, and `pause copy` touches nothing
    assert ControlClient.open(store.run_dir("copy")) is None
    before = run.steps()
    code, out, err = run_cli(capsys, "pause", "copy", "--runs-dir", str(store.root))
    assert (code, out) == (1, "")
    assert err == "tui-trainer: error: cannot pause copy: it is not running (status: interrupted)\n"
    code, out, _ = run_cli(capsys, "status", "copy", "--json", "--runs-dir", str(store.root))
    assert code == 0 and json.loads(out)["live"] is False
    wait_for(lambda: run.steps() >= before + 3, 60, "the original to step on")
    assert run.thread.is_alive()
    assert read_run_id(store.run_dir("copy")) == run.server.run_id  # (the copy carries the original's run id)
    # a trainer on the copy, while the original trains: its own socket, its own link
    copy = live(plan_resume(store, "copy"))
    wait_for(lambda: find_socket(copy.run_dir) == copy.server.path, 30, "the copy's own link")
    assert copy.server.path != run.server.path and find_socket(run.run_dir) == run.server.path
    with ControlClient.open(copy.run_dir) as client:
        assert client.hello["run"] == "copy" and client.hello["run_dir"] == str(copy.run_dir.resolve())
    copy.pause_and_check()  # pausing the copy pauses the copy only
    assert run.thread.is_alive() and run.state == ""
    run.pause_and_check()


def test_a_link_from_a_run_of_the_same_name_and_place_but_another_run_id_is_not_followed(tmp_path):
    """The run id tells runs apart that name and path cannot: e.g. a run deleted and made again under the
    same name, with the old process's link put back."""
    store = RunStore(tmp_path / "runs")
    store.create_run("r", {}, None)
    server = ControlServer(store.run_dir("r"), Recorder())
    server.start()
    try:
        server.publish(StateChanged("r", State.RUNNING, 3))
        wait_for(lambda: find_socket(store.run_dir("r")) == server.path, 10, "the link")
        with ControlClient.open(store.run_dir("r")) as client:
            assert client.hello["run_id"] == read_run_id(store.run_dir("r"))
        record = store.read_record("r")
        (store.run_dir("r") / "run.json").write_text(json.dumps({**record, "run_id": "0" * 32}))
        assert ControlClient.open(store.run_dir("r")) is None
    finally:
        server.close()


def test_a_run_made_before_run_ids_is_still_served_by_name_and_directory(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.create_run("old", {}, None)
    record = {k: v for k, v in store.read_record("old").items() if k != "run_id"}
    (store.run_dir("old") / "run.json").write_text(json.dumps(record))
    server = ControlServer(store.run_dir("old"), Recorder())
    server.start()
    try:
        server.publish(StateChanged("old", State.RUNNING, 3))
        wait_for(lambda: find_socket(store.run_dir("old")) == server.path, 10, "the link")
        with ControlClient.open(store.run_dir("old")) as client:
            assert client.hello["run_id"] is None and client.request("status")["status"]["step"] == 3
        # a copy of an id-less run is still told apart: by its directory
        shutil.copytree(store.run_dir("old"), store.run_dir("old2"), symlinks=True)
        assert find_socket(store.run_dir("old2")) == server.path
        assert ControlClient.open(store.run_dir("old2")) is None
    finally:
        server.close()


# ---------------------------------------------------------------- item 2: a fake socket


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """A finished run `p` with valid checkpoints: what a fake "saved" would pretend to have made."""
    root = tmp_path_factory.mktemp("fake") / "runs"
    store = RunStore(root)
    config = load_config(None, tiny_overrides(small_corpus))
    assert Trainer(store, plan_train(store, config, "p")).run() == State.FINISHED
    return root


@pytest.fixture
def fake(trained: Path) -> Iterator[Callable[[Callable[[dict[str, Any]], list[bytes]]], RunStore]]:
    """fake(script): a socket that `p`'s control.sock leads to, served by a thread of this test: it sends
    script(hello)'s first line at once, then one more line per request it reads, then hangs up."""
    store = RunStore(trained)
    run_dir = store.run_dir("p")
    directory = Path(tempfile.mkdtemp(prefix="tt-fake-"))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(directory / "fake.sock"))
    listener.listen(8)
    threads = []

    def start(script: Callable[[dict[str, Any]], list[bytes]]) -> RunStore:
        hello = fake_hello(run_dir, step=55, pid=os.getpid())
        lines = script(hello)

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(lines[0])
                    for line in lines[1:]:
                        conn.recv(4096)
                        conn.sendall(line)
                    conn.recv(4096)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        (run_dir / LINK_NAME).unlink(missing_ok=True)
        os.symlink(directory / "fake.sock", run_dir / LINK_NAME)
        return store

    yield start
    (run_dir / LINK_NAME).unlink(missing_ok=True)
    listener.close()
    shutil.rmtree(directory)
    for thread in threads:
        thread.join(timeout=10)


def line(message: Any) -> bytes:
    return json.dumps(message).encode() + b"\n"


FAKES: dict[str, tuple[str, Callable[[dict[str, Any]], list[bytes]], str]] = {
    # name: (command, the fake's lines, what the one error line says)
    "ok save without a step": (
        "save",
        lambda h: [line(h), line({"reply": "save", "ok": True})],
        "the save reply's after_step is None, not a step number",
    ),
    "garbage": ("save", lambda h: [b"garbage\n"], "a line that is not JSON"),
    "a pause step that is no number": (
        "pause",
        lambda h: [line(h), line({"reply": "pause", "id": 1, "ok": True, "step": "x"})],
        "the pause reply's step is 'x', not a step number",
    ),
    "a checkpoint event whose step is no number": (
        "save",
        lambda h: [
            line(h) + line({"reply": "save", "id": 1, "ok": True, "after_step": 0}),
            line({"event": "CheckpointSaved", "run": "p", "step": "x", "path": "/", "seconds": 0, "bytes": 0}),
        ],
        "a CheckpointSaved event whose step is 'x'",
    ),
    "a hello that names no run id or dir": (
        "pause",
        lambda h: [line({k: v for k, v in h.items() if k not in ("run_id", "run_dir")})],
        "a bad hello (the hello has no run_id)",
    ),
    "a status of the wrong types": (
        "status",
        lambda h: [line(h), line({"reply": "status", "id": 1, "ok": True, "status": {**h["status"], "step": "x"}})],
        "the status's step is 'x'",
    ),
    "a thousand nested brackets": ("status", lambda h: [b"[" * 1000 + b"]" * 1000 + b"\n"], "nested deeper than"),
    "a reply to another request": (
        "pause",
        lambda h: [line(h), line({"reply": "pause", "id": 7, "ok": True, "step": 60})],
        "a reply to another request",
    ),
    "a list instead of an object": ("status", lambda h: [line([1, 2])], "a line that is not a JSON object"),
}


@pytest.mark.parametrize("case", list(FAKES))
def test_a_fake_socket_gets_one_clear_line_never_a_traceback_or_a_false_success(case, fake, capsys):
    cmd, script, says = FAKES[case]
    store = fake(script)
    code, out, err = run_cli(capsys, cmd, "p", "--runs-dir", str(store.root))
    assert (code, out) == (1, ""), err
    assert says in one_line_error(err) and "the control socket of p sent" in err, err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_socket_served_by_another_user_is_refused_before_anything_is_sent(trained, capsys):
    """A perfect impersonation (the right hello, an ok to everything) but by another uid: refused on
    SO_PEERCRED alone, before the request goes out."""
    store = RunStore(trained)
    run_dir = store.run_dir("p")
    directory = Path(tempfile.mkdtemp(prefix="tt-other-"))
    os.chmod(directory, 0o777)
    hello = fake_hello(run_dir, step=1, pid=1)
    server = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "import os; os.chmod(sys.argv[1], 0o777); print('ready', flush=True)\n"
        "c, _ = s.accept()\n"
        "try:\n    c.sendall(sys.argv[2].encode() + b'\\n'); got = c.recv(4096)\n"
        "except OSError:\n    got = b''\n"
        "print('got', repr(got), flush=True)\n"
    )
    sock_path = directory / "other.sock"
    proc = subprocess.Popen(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            sys.executable,
            "-c",
            server,
            str(sock_path),
            json.dumps(hello),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        os.symlink(sock_path, run_dir / LINK_NAME)
        code, out, err = run_cli(capsys, "pause", "p", "--runs-dir", str(store.root))
        assert (code, out) == (1, "")
        assert one_line_error(err) == (
            "tui-trainer: error: the control socket of p is served by uid 65534, not by you (uid 0): not using it\n"
        )
        assert proc.communicate(timeout=30)[0] == "got b''\n"  # it never got a request
    finally:
        (run_dir / LINK_NAME).unlink(missing_ok=True)
        proc.kill()
        shutil.rmtree(directory)


# ---------------------------------------------------------------- item 6: dispatch survives any input


def test_a_thousand_nested_brackets_get_an_error_reply_and_the_channel_serves_on(live):
    run = live()
    sock = raw(run)
    deep = b"[" * 1000 + b"]" * 1000
    edge = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    sock.sendall(
        b'{"cmd": "status", "id": ' + deep + b"}\n" + b"[" * 60_000 + b"\n"
        b'{"cmd": "status", "id": ' + edge[2:-2] + b"}\n"  # the object is one level: MAX_DEPTH in all
        b'{"cmd": "status", "id": "after"}\n'
    )
    got = replies(read_lines(sock, '"after"'))
    assert [r["ok"] for r in got] == [False, False, True, True], got
    assert got[0] == {"reply": None, "ok": False, "error": f"malformed JSON: nested deeper than {MAX_DEPTH} levels"}
    assert got[2]["id"] == json.loads(edge[2:-2])
    sock.close()
    before = run.steps()
    wait_for(lambda: run.steps() >= before + 3, 60, "3 more steps")
    assert run.server.restarts == 0 and find_socket(run.run_dir) == run.server.path
    run.pause_and_check()  # a fresh client, through the link, pauses it


class FailsOnce(ControlServer):
    """A server whose loop hits an unforeseen error once (where no input can reach: injected)."""

    failed = False

    def _maintain(self) -> None:
        if not self.failed and self._linked:
            self.failed = True
            raise RuntimeError("injected")
        super()._maintain()


def test_a_failed_server_loop_is_restarted_and_says_so(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.create_run("r", {}, None)
    said: list[str] = []
    server = FailsOnce(store.run_dir("r"), Recorder(), log=said.append)
    first = server.start()
    try:
        server.publish(StateChanged("r", State.RUNNING, 3))
        wait_for(lambda: server.restarts == 1, 10, "the restart")
        assert said == ["control channel failed (RuntimeError: injected); restarted it (clients must reconnect)"]
        wait_for(lambda: find_socket(store.run_dir("r")) == server.path, 10, "the new link")
        assert server.path == first and server.path.exists()  # the same name: this process's socket
        with ControlClient.open(store.run_dir("r")) as client:
            assert client.request("status")["status"]["state"] == "Running"
    finally:
        server.close()
    assert not server.path.exists() and not (store.run_dir("r") / LINK_NAME).exists()


def test_a_loop_that_keeps_failing_turns_the_channel_off_and_says_so(tmp_path):
    class AlwaysFails(ControlServer):
        RESTARTS = 2

        def _maintain(self) -> None:
            raise RuntimeError("again")

    said: list[str] = []
    server = AlwaysFails(tmp_path, Recorder(), log=said.append)
    path = server.start()
    wait_for(lambda: not server._running, 10, "the server to give up")
    assert said[-1] == (
        f"control channel failed 3 times in 60s (RuntimeError: again); the channel is off now (pause the run "
        f"with SIGTERM: kill {os.getpid()})"
    )
    assert server.restarts == 2 and not path.exists()
    server.close()


def test_a_socket_removed_under_a_live_run_is_served_again(live):
    said: list[str] = []
    run = live(log=said.append)
    old = run.server.path
    assert old is not None
    old.unlink()  # logind at logout, or a /tmp cleaner
    wait_for(lambda: said, 10, "the note")
    wait_for(lambda: find_socket(run.run_dir) == run.server.path, 10, "the new link")
    assert said == [f"control socket {old} was removed; serving the run at {run.server.path} now"]
    run.pause_and_check()


# ---------------------------------------------------------------- item 10: busy, and the socket dir


def test_too_many_clients_is_busy_exit_75_not_bad_input(live, capsys):
    run = live(max_clients=1)
    with run.client():
        code, out, err = run_cli(capsys, "status", "r", "--runs-dir", str(run.store.root))
    assert (code, out) == (75, "")
    assert one_line_error(err) == (
        "tui-trainer: error: the process training r is busy: too many clients (1); try again later\n"
    )
    run.pause_and_check()


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary dir standing in for /tmp (as $TMPDIR does): sockets need short paths."""
    base = Path(tempfile.mkdtemp(prefix="tt-"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def serve_briefly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[str]]:
    """Start a server for a run, check a client reaches it through the link, stop it: (socket, the notes
    it printed on stderr)."""
    store = RunStore(tmp_path / "runs")
    store.create_run("r", {}, None)
    server = ControlServer(store.run_dir("r"), Recorder())
    capsys.readouterr()
    path = server.start()
    try:
        server.publish(StateChanged("r", State.RUNNING, 1))
        wait_for(lambda: find_socket(store.run_dir("r")) == path, 10, "the link")
        client = ControlClient.open(store.run_dir("r"))
        assert client is not None
        with client:
            assert client.request("status")["ok"]
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        server.close()
    assert not path.exists()
    err = capsys.readouterr().err
    assert all(line.startswith("tui-trainer: note: ") for line in err.splitlines()), err
    return path, [line.removeprefix("tui-trainer: note: ") for line in err.splitlines()]


def test_the_socket_goes_in_xdg_runtime_dir_when_it_is_private(tmp_path, short_tmp, monkeypatch, capsys):
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    path, said = serve_briefly(tmp_path, capsys)
    assert path.parent == xdg / "tui-trainer" and said == []


def test_a_loose_xdg_runtime_dir_is_passed_over_with_a_note(tmp_path, short_tmp, monkeypatch, capsys):
    xdg = short_tmp / "xdg"
    xdg.mkdir()
    xdg.chmod(0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    path, said = serve_briefly(tmp_path, capsys)
    assert path.parent == short_tmp / f"tui-trainer-{os.getuid()}"
    assert said == [f"not using $XDG_RUNTIME_DIR for the control socket: {xdg} has mode 0755 (not 0700)"]


def _plant(kind: str, planted: Path) -> str:
    """Make `planted` (the shared socket dir's name) a trap of `kind`; what the note says about it."""
    if kind == "symlink":
        target = planted.parent / "elsewhere"
        target.mkdir(mode=0o700)
        planted.symlink_to(target)
        return f"{planted} is a symlink"
    if kind == "file":
        planted.write_text("")
        return f"{planted} is not a directory"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    return f"{planted} belongs to uid 65534, not to you (uid {os.getuid()})"


@pytest.mark.parametrize("kind", ["symlink", "file", "another user's dir"])
def test_a_planted_shared_socket_dir_never_switches_the_channel_off(tmp_path, short_tmp, kind, capsys):
    if kind == "another user's dir" and os.geteuid() != 0:
        pytest.skip("needs root to make a dir of another user")
    planted = short_tmp / f"tui-trainer-{os.getuid()}"
    why = _plant(kind, planted)
    path, said = serve_briefly(tmp_path, capsys)
    assert path.parent.parent == short_tmp and path.parent.name.startswith(f"tui-trainer-{os.getuid()}-")
    assert said == [f"control socket in {path.parent} instead: {why}"]
    assert not path.parent.exists()  # a one-process dir goes with its process
    assert planted.is_symlink() or planted.exists()  # the trap itself is left alone


def test_a_shared_socket_dir_of_ours_with_a_loose_mode_is_made_private(tmp_path, short_tmp, capsys):
    shared = short_tmp / f"tui-trainer-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    path, said = serve_briefly(tmp_path, capsys)
    assert path.parent == shared and said == [] and shared.stat().st_mode & 0o777 == 0o700


def test_a_refused_client_is_told_why_in_one_line(tmp_path):
    server = ControlServer(tmp_path, Recorder(), allowed_uid=os.getuid() + 1)
    path = server.start()
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        with pytest.raises(ChannelRefused, match=r"refused the connection: permission denied: uid \d+ is not"):
            ControlClient(sock, 10, name="r")
    finally:
        server.close()
