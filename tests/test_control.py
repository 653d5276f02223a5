"""The control channel: a live run's Unix socket. Real training (in-process or a real CLI process), real
sockets, real hostile clients; training must go on untouched whatever a client does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faults_support import Proc, cli, sets
from support.waiting import wait_for

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.protocol import LINK_NAME, MAX_LINE, PROTOCOL, connect, find_socket
from tui_trainer.control.server import ControlServer
from tui_trainer.control.tee import Tee
from tui_trainer.core.config import load_config
from tui_trainer.core.events import CheckpointSaved, State, StateChanged, StepLogged
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer


def long_run(tiny: Any, **extra: Any) -> list[str]:
    """A schedule far longer than any test: only a pause ends the run."""
    return tiny(train__max_steps=100_000, train__eval_every=0, checkpoint__every_steps=0, **extra)


@dataclass
class Live:
    """A real Trainer on its own thread, serving its control socket like the headless CLI does."""

    store: RunStore
    trainer: Trainer
    server: ControlServer
    thread: threading.Thread
    events: list[Any] = field(default_factory=list)
    state: str = ""

    @property
    def run_dir(self) -> Path:
        return self.store.run_dir(self.trainer.run_name)

    def client(self) -> ControlClient:
        client = ControlClient.open(self.run_dir)
        assert client is not None, "no live control socket"
        return client

    def steps(self) -> int:
        return max((e.step for e in self.events if isinstance(e, StepLogged)), default=0)

    def pause_and_check(self) -> int:
        """Pause through a fresh client: the run halts at the promised step and that checkpoint verifies."""
        with self.client() as client:
            reply = client.request("pause")
        assert reply["ok"], reply
        self.thread.join(timeout=60)
        assert self.state == State.PAUSED
        verify_checkpoint(self.store.checkpoint_dir(self.trainer.run_name, reply["step"]))
        assert self.server.path is not None and not self.server.path.exists()  # removed on exit
        assert not (self.run_dir / LINK_NAME).is_symlink()
        return int(reply["step"])


@pytest.fixture
def live(tmp_path: Path, tiny: Any):
    started: list[Live] = []

    def start(plan: Any = None, **server_options: Any) -> Live:
        store = RunStore(tmp_path / "runs")
        plan = plan or plan_train(store, load_config(None, long_run(tiny)), "r")
        sink = Tee()
        trainer = Trainer(store, plan, sink)
        server = ControlServer(store.run_dir(plan.run), trainer, **server_options)
        server.start()
        sink.add(server.publish)
        handle = Live(store, trainer, server, threading.Thread(target=lambda: None))
        sink.add(handle.events.append)

        def train() -> None:
            try:
                handle.state = trainer.run()
            finally:
                server.close()

        handle.thread = threading.Thread(target=train, daemon=True)
        handle.thread.start()
        wait_for(lambda: find_socket(handle.run_dir) is not None or not handle.thread.is_alive(), 120, "the socket")
        wait_for(lambda: handle.steps() >= 2, 60, "step 2")
        started.append(handle)
        return handle

    yield start
    for handle in started:  # a failed test must not leave a thread training
        handle.trainer.stop()
        handle.thread.join(timeout=60)


def raw(live: Live) -> socket.socket:
    path = find_socket(live.run_dir)
    assert path is not None
    sock = connect(path)
    assert sock is not None
    return sock


def read_lines(sock: socket.socket, until: str, limit: int = 100_000) -> list[dict[str, Any]]:
    """Messages up to and including the first one containing `until` (or EOF)."""
    out, buf = [], b""
    sock.settimeout(30)
    while len(out) < limit:
        while b"\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return out
            buf += data
        line, buf = buf.split(b"\n", 1)
        out.append(json.loads(line))
        if until in line.decode():
            return out
    return out


def replies(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if "ok" in m]


# ---------------------------------------------------------------- hostile clients, each a test


def test_malformed_requests_get_an_error_reply_and_the_connection_stays_usable(live):
    run = live()
    sock = raw(run)
    sock.sendall(b'{not json\n[1, 2]\n\xff\xfe\n{"cmd": 7}\n{"cmd": "status", "id": "after"}\n')
    got = replies(read_lines(sock, '"after"'))
    assert [r["ok"] for r in got] == [False, False, False, False, True]
    assert got[0]["error"].startswith("malformed JSON")
    assert got[1]["error"] == 'expected a JSON object with a "cmd" string'
    assert got[2]["error"].startswith("malformed JSON")
    assert got[4]["status"]["state"] == State.RUNNING
    sock.close()
    run.pause_and_check()


def test_unknown_command_is_refused_by_name(live):
    run = live()
    sock = raw(run)
    sock.sendall(b'{"cmd": "explode", "id": 1}\n')
    (reply,) = replies(read_lines(sock, '"reply"'))
    assert reply == {
        "reply": "explode",
        "id": 1,
        "ok": False,
        "error": "unknown command 'explode'; expected one of pause, save, status, stop",
    }
    sock.close()
    run.pause_and_check()


def test_a_100mb_line_cuts_that_client_off_and_training_goes_on(live):
    run = live()
    sock = raw(run)
    before = run.steps()
    with pytest.raises(OSError):  # the server hangs up long before 100 MB went through
        sock.sendall(b"x" * (100 * 2**20))
    got = replies(read_lines(sock, "disconnecting"))
    assert got[-1]["error"] == f"request line longer than {MAX_LINE} bytes; disconnecting"
    assert run.server.cut_off == 1
    wait_for(lambda: run.steps() >= before + 5, 60, "5 more steps")
    run.pause_and_check()


def test_a_client_that_never_reads_does_not_stall_training_and_is_cut_off_when_it_hoards(live):
    run = live(queue_limit=64)
    idle = raw(run)  # connects, never reads: its progress events are dropped, training never waits
    hoarder = raw(run)  # asks and asks but never reads the replies (which must not be dropped)
    hoarder.setblocking(False)
    before = run.steps()
    request = b'{"cmd": "status"}\n' * 1000
    with pytest.raises(OSError):  # cut off: its queue of replies overflowed
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                hoarder.send(request)
            except BlockingIOError:
                time.sleep(0.01)
    assert run.server.cut_off >= 1
    wait_for(lambda: run.steps() >= before + 20, 120, "20 more steps with a non-reading client attached")
    with run.client() as client:  # later clients are served at once
        assert client.request("status")["status"]["step"] > before
    run.pause_and_check()
    idle.close()


def test_fifty_clients_connecting_and_dropping_leave_the_server_serving(live):
    run = live(max_clients=8)  # a dropped client that lingered would use a slot up
    before = run.steps()
    for i in range(50):
        sock = raw(run)
        if i % 2:
            sock.recv(100)  # half of them read part of the hello first
        sock.close()
    wait_for(lambda: run.steps() >= before + 5, 60, "5 more steps")
    # (a burst past the cap is turned away with an error reply; once they are gone every slot is free)
    for _ in range(8):
        with run.client() as client:
            assert client.hello["hello"] == "tui-trainer"
    run.pause_and_check()


# ---------------------------------------------------------------- the stream


def next_step(client) -> int:
    """The step of the next StepLogged (device samples and notices may come between)."""
    while True:
        event = client.next_event(30)
        if event["event"] == "StepLogged":
            return event["step"]


def test_several_clients_see_the_same_live_stream_and_a_save(live):
    run = live()
    a, b = run.client(), run.client()
    assert a.hello["protocol"] == PROTOCOL and a.hello["run"] == "r" and a.hello["pid"] == os.getpid()
    steps_a = [next_step(a) for _ in range(3)]
    assert steps_a == sorted(steps_a) and len(set(steps_a)) == 3
    reply = a.request("save")
    assert reply["ok"]
    saved = {}
    for client in (a, b):
        while True:
            event = client.next_event(30)
            if event["event"] == "CheckpointSaved":
                saved[client] = event["step"]
                break
    assert saved[a] == saved[b] >= reply["after_step"]
    verify_checkpoint(Path(run.store.checkpoint_dir("r", saved[a])))
    step = run.pause_and_check()
    # both saw the final state, then the end of the stream
    for client in (a, b):
        last = []
        with pytest.raises(ChannelClosed):
            while True:
                last.append(client.next_event(30))
        assert last[-1]["event"] == "StateChanged" and last[-1]["state"] == State.PAUSED and last[-1]["step"] == step
        client.close()


def test_stop_halts_without_saving_and_the_stream_ends(live):
    run = live()
    with run.client() as client:
        assert client.request("stop") == {"reply": "stop", "id": 1, "ok": True}
        events = []
        with pytest.raises(ChannelClosed):
            while True:
                events.append(client.next_event(30))
    run.thread.join(60)
    assert run.state == State.STOPPED
    assert events[-1]["event"] == "StateChanged" and events[-1]["state"] == State.STOPPED
    assert run.store.run("r").checkpoints == []


class Recorder:
    """A control object that records what it was asked (for the server's own policies)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> int:
        self.calls.append("pause")
        return 7

    def save_now(self) -> None:
        self.calls.append("save")

    def stop(self) -> None:
        self.calls.append("stop")


def test_a_slow_reader_loses_progress_events_never_state_or_checkpoints(tmp_path):
    # (a real training thread publishes at most a few thousand events a second; this loop publishes far
    # faster, so the server's own inbox bound is lifted to test the per-client queues alone)
    server = ControlServer(tmp_path / "run", Recorder(), queue_limit=256, inbox_limit=100_000)
    (tmp_path / "run").mkdir()
    path = server.start()
    try:
        sock = connect(path)
        assert sock is not None
        read_lines(sock, "hello")
        server.publish(StateChanged("run", State.RUNNING, 0))
        for step in range(1, 20_001):  # ~4 MB of progress, far past the socket buffers
            server.publish(StepLogged("run", step, 1.0, 1e-3, step, 1.0, 0.01, 20_000, 1.0))
            if step % 1000 == 0:
                server.publish(CheckpointSaved("run", step, f"ckpt-{step}", 0.1, 10))
        server.publish(StepLogged("run", 20_001, float("nan"), 1e-3, 1, 1.0, 0.01, 20_000, 1.0))
        server.publish(StateChanged("run", State.PAUSED, 20_001))
        messages = read_lines(sock, '"Paused"')
    finally:
        server.close()
    saved = [m["step"] for m in messages if m["event"] == "CheckpointSaved"]
    steps = [m["step"] for m in messages if m["event"] == "StepLogged"]
    assert saved == list(range(1000, 20_001, 1000))
    assert len(steps) < 20_000 and steps == sorted(steps)  # some progress dropped, the rest in order
    assert messages[-2] == {  # the newest progress survives, sanitised to standard JSON
        **messages[-2],
        "step": 20_001,
        "loss": None,
        "nonfinite": {"loss": "nan"},
    }


def test_a_peer_with_another_uid_is_refused_before_any_command(tmp_path):
    recorder = Recorder()
    server = ControlServer(tmp_path, recorder, allowed_uid=os.getuid() + 1)
    path = server.start()
    try:
        sock = connect(path)
        assert sock is not None
        with contextlib.suppress(BrokenPipeError):  # it may have hung up already
            sock.sendall(b'{"cmd": "pause"}\n')
        (refusal,) = read_lines(sock, "permission")
        assert refusal == {
            "ok": False,
            "error": f"permission denied: uid {os.getuid()} is not the owner of this run",
            "busy": False,
        }
        with contextlib.suppress(ConnectionResetError):  # and hung up (a reset: it never read our line)
            assert sock.recv(100) == b""
    finally:
        server.close()
    assert recorder.calls == [] and server.refused == 1


NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_user_cannot_even_reach_the_socket(tmp_path):
    server = ControlServer(tmp_path, Recorder())
    path = server.start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES')\n"
            "else:\n    print('CONNECTED', s.recv(200))\n"
        )
        out = subprocess.run(
            [
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                sys.executable,
                "-c",
                probe,
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() == "EACCES", out.stdout + out.stderr
    finally:
        server.close()
    assert server.refused == 0  # the kernel stopped it before it reached the server


# ---------------------------------------------------------------- real processes


@pytest.mark.slow
def test_headless_run_streams_to_a_client_and_pause_stops_it_at_the_promised_step(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    proc = Proc(["train", "--run", "h", "--headless", "--runs-dir", str(store.root), *sets(long_run(tiny))], tmp_path)
    run_dir = store.run_dir("h")
    client = wait_for(lambda: ControlClient.open(run_dir) or (not proc.alive() and proc.stderr), 120, "the socket")
    assert isinstance(client, ControlClient), client
    assert client.hello["hello"] == "tui-trainer" and client.hello["pid"] == proc.pid
    steps = []
    while len(steps) < 3:
        event = client.next_event(30)
        if event["event"] == "StepLogged":
            steps.append(event["step"])
    assert steps == sorted(steps)
    saved = cli("save", "h", "--runs-dir", str(store.root), cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr
    at = int(saved.stdout.split(" at step ")[1].split(":")[0])
    assert saved.stdout == f"saved h at step {at}: {store.checkpoint_dir('h', at)}\n" and at >= steps[-1]
    verify_checkpoint(store.checkpoint_dir("h", at))
    assert proc.alive()  # saving does not stop it
    out = cli("pause", "h", "--runs-dir", str(store.root), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    step = int(out.stdout.split(" at step ")[1].split(":")[0])
    assert out.stdout == f"paused h at step {step}: {store.checkpoint_dir('h', step)}\n"
    assert proc.wait(60) == 0, proc.stderr
    verify_checkpoint(store.checkpoint_dir("h", step))
    assert store.run("h").newest.step == step >= at
    with pytest.raises(ChannelClosed):  # the stream ends with the run
        while True:
            client.next_event(30)
    client.close()
    assert not (run_dir / LINK_NAME).is_symlink()


@pytest.mark.slow
def test_detach_returns_at_once_and_the_run_is_controlled_from_outside(tmp_path, tiny):
    root = str(tmp_path / "runs")
    started = time.monotonic()
    out = cli("train", "--detach", "--runs-dir", root, *sets(long_run(tiny)), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 20  # it did not wait for training (the child imports torch)
    assert out.stdout.startswith("run-1 is training in the background (pid "), out.stdout
    log = tmp_path / "runs" / "run-1" / "train.log"
    assert f"output: {log}" in out.stdout

    def status() -> dict[str, Any]:
        result = cli("status", "run-1", "--json", "--runs-dir", root, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = wait_for(lambda: (s := status())["live"] and s["step"] > 0 and s, 120, "a live step")
    assert first["state"] == State.RUNNING and first["pid"] != os.getpid()
    wait_for(lambda: status()["step"] > first["step"], 60, "the step to grow")
    paused = cli("pause", "run-1", "--runs-dir", root, cwd=tmp_path)
    assert paused.returncode == 0, paused.stderr
    step = int(paused.stdout.split(" at step ")[1].split(":")[0])
    wait_for(lambda: not status()["live"], 60, "the background process to end")
    final = status()
    assert final["state"] == "paused" and final["last_checkpoint"]["step"] == step
    wait_for(lambda: f"Paused run-1 at step {step}" in log.read_text(), 30, "the log's last line")
    again = cli("pause", "run-1", "--runs-dir", root, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr == "tui-trainer: error: cannot pause run-1: it is not running (status: paused)\n"
    # resume detaches too (its run keeps its name), and the next pause stops it again
    resumed = cli("resume", "run-1", "--detach", "--runs-dir", root, cwd=tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.startswith("run-1 is training"), resumed.stderr
    wait_for(lambda: (s := status())["live"] and s["step"] > step, 120, "the resumed run to step on")
    paused = cli("pause", "run-1", "--json", "--runs-dir", root, cwd=tmp_path)
    assert paused.returncode == 0, paused.stderr
    second = json.loads(paused.stdout)
    assert second["run"] == "run-1" and second["step"] > step
    assert second["checkpoint"] == str(tmp_path / "runs" / "run-1" / "checkpoints" / f"step-{second['step']:08d}")
    wait_for(lambda: not status()["live"], 60, "the resumed process to end")
    # resuming an older checkpoint branches: the background process trains the branch this command named
    branched = cli("resume", f"run-1@{step}", "--detach", "--runs-dir", root, cwd=tmp_path)
    assert branched.returncode == 0, branched.stderr
    pid = int(re.search(r"\(pid (\d+)\)", branched.stdout).group(1))  # type: ignore[union-attr]
    try:
        name = f"run-1-from{step}"
        assert branched.stdout.startswith(f"{name} is training in the background"), branched.stdout
        wait_for(lambda: _live(tmp_path, root, name), 120, "the branch")
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-1", name]
        assert cli("pause", name, "--runs-dir", root, cwd=tmp_path).returncode == 0
    finally:  # a failed check must not leave a run training in the background
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _live(cwd: Path, root: str, run: str) -> bool:
    """Training (a live process still preparing data takes no commands yet)."""
    record = json.loads(cli("status", run, "--json", "--runs-dir", root, cwd=cwd).stdout)
    return bool(record["live"]) and record["state"] != "Starting"


def test_detach_with_bad_input_starts_nothing(tmp_path, tiny):
    out = cli("train", "--detach", "--runs-dir", "runs", *sets(tiny(optim__lr=5)), cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.count("\n") == 1 and "optim.lr" in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


def test_control_commands_name_a_missing_run_and_a_run_not_running(tmp_path, tiny):
    missing = cli("pause", "nope", "--runs-dir", "runs", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == "tui-trainer: error: no run named 'nope' in ./runs/\n", missing.stderr
    store = RunStore(tmp_path / "runs")
    assert Trainer(store, plan_train(store, load_config(None, tiny()), "done")).run() == State.FINISHED
    for verb in ("pause", "save"):
        out = cli(verb, "done", "--runs-dir", "runs", cwd=tmp_path)
        assert out.returncode == 1
        assert out.stderr == f"tui-trainer: error: cannot {verb} done: it is not running (status: finished)\n"
    status = cli("status", "done", "--runs-dir", "runs", cwd=tmp_path)
    assert status.returncode == 0
    assert status.stdout.startswith("done  finished (not running)  step 12/12  loss "), status.stdout
    assert status.stdout.rstrip().endswith("last checkpoint 12"), status.stdout


@pytest.mark.slow
def test_a_stale_socket_after_kill_9_is_ignored_and_replaced(tmp_path, tiny, live):
    store = RunStore(tmp_path / "runs")
    proc = Proc(["train", "--run", "r", "--headless", "--runs-dir", str(store.root), *sets(long_run(tiny))], tmp_path)
    client = wait_for(lambda: ControlClient.open(store.run_dir("r")) or not proc.alive(), 120, "the socket")
    assert isinstance(client, ControlClient), proc.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    with pytest.raises(ChannelClosed):  # an attached client sees EOF
        while True:
            client.next_event(30)
    assert (store.run_dir("r") / LINK_NAME).is_symlink()  # left behind, and not trusted:
    assert ControlClient.open(store.run_dir("r")) is None
    out = cli("status", "r", "--runs-dir", str(store.root), cwd=tmp_path)
    assert out.returncode == 0 and "(not running)" in out.stdout, out.stdout + out.stderr
    # the next process to train the run takes the name over
    run = live(plan_resume(store, "r"))
    assert find_socket(run.run_dir) == run.server.path
    run.pause_and_check()
