"""The hardening list, item by item, against real backend processes on loopback (bench/attack.py),
a stop that hangs, and the policy for Label Studio's address learnt from /setup, in process."""
import os
import signal
import sys
import time

import pytest
import requests

from backend.app import create_app
from backend.service import SegmentationService
from backend.settings import Settings
from bench.attack import ATTACKS, lab_session
from demo.labelstudio import ManagedProcess, backend_env, free_port, is_running, wait_for

SCHEMA = '<View><Image name="i" value="$i"/><BrushLabels name="m" toName="i"><Label value="a"/></BrushLabels></View>'


@pytest.mark.parametrize("attack", ATTACKS, ids=[f"{n}-{a.__name__}" for n, a in enumerate(ATTACKS, 1)])
def test_attack_is_held(attack):
    with lab_session() as lab:
        try:
            outcome = attack(lab)
        except BaseException:  # pytest shows this output with the failure: the backends' own words
            for backend in lab.backends:
                print(f"--- {backend.url} (exit code {backend.process.process.poll()}):\n{backend.log()[-6000:]}")
            raise
    if outcome.startswith("skipped"):
        pytest.skip(outcome)


def test_a_stop_that_hangs_is_cut_and_logs_where_it_was_stuck(tmp_path):
    """SIGTERM while stopping the training jobs blocks: past GRACEFUL_TIMEOUT + the margin the service
    exits (code 1) by itself, its log holding the stuck thread's stack."""
    hang = ("import time, backend.__main__ as server, backend.service as service; server.STOP_MARGIN_SECONDS = 1; "
            "service.SegmentationService.shutdown = lambda self: time.sleep(600); server.main()")
    port = free_port()
    env = backend_env(tmp_path / "model_dir", None, {"HOST": "127.0.0.1", "PORT": str(port), "GRACEFUL_TIMEOUT": "1"})
    process = ManagedProcess([sys.executable, "-c", hang], env, tmp_path / "backend.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 120, process.process, process.log)
        # The model loads in a thread of its own; dumping the stacks of a thread in the middle of an import can
        # crash the interpreter (SIGSEGV instead of exit 1), so the stop comes once it has settled.
        deadline = time.monotonic() + 120
        while (requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["model_state"] == "loading"
               and time.monotonic() < deadline):
            time.sleep(0.2)
        process.process.send_signal(signal.SIGTERM)
        code = process.process.wait(30)
    finally:
        process.stop()
    log = process.log.read_text()
    assert code == 1, log[-3000:]
    assert "Timeout" in log and "in <lambda>" in log and "in serve" in log, log[-3000:]


def test_stopping_a_process_also_stops_what_it_left_in_its_group(tmp_path):
    """The harness stops by process group: a child left behind by a process that already exited (as a hung
    fork of the service was) goes too."""
    leave_a_child = "import os, sys, time; pid = os.fork(); print(pid, flush=True) if pid else time.sleep(600)"
    process = ManagedProcess([sys.executable, "-c", leave_a_child], dict(os.environ), tmp_path / "fork.log")
    process.process.wait(30)
    child = int(process.log.read_text().split()[0])
    assert is_running(child)  # alive, its parent gone
    process.stop()
    deadline = time.monotonic() + 5
    while is_running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_running(child)


def _client(tmp_path, **settings):
    service = SegmentationService(Settings(model_dir=tmp_path, **settings), model_loader=None)
    return create_app(service.settings, service).test_client(), service


def _setup(client, host, project="1", token="t", **kwargs):
    return client.post("/setup", json={"schema": SCHEMA, "hostname": host, "access_token": token,
                                       "project": f"{project}.1700000000"}, **kwargs)


def _served(service, project="1"):
    client = service.credentials.for_project(project)
    return (client.url, client.token) if client is not None else None


def test_first_label_studio_is_trusted_and_remembered(tmp_path):
    client, service = _client(tmp_path, label_studio_api_key="K")
    assert _setup(client, "http://10.0.0.5:8080").status_code == 200
    assert _served(service) == ("http://10.0.0.5:8080", "t")
    assert _setup(client, "http://10.0.0.6:8080").status_code == 403
    restarted, service = _client(tmp_path)
    assert _served(service) == ("http://10.0.0.5:8080", "")  # its token comes back with the next /setup
    assert _setup(restarted, "http://10.0.0.6:8080").status_code == 403  # the trust survives a restart
    assert _setup(restarted, "http://10.0.0.5:8080").status_code == 200
    assert _served(service) == ("http://10.0.0.5:8080", "t")


def test_a_token_serves_its_own_project_and_changing_it_takes_basic_auth(tmp_path):
    client, service = _client(tmp_path)
    assert _setup(client, "http://ls:8080", project="1", token="token-one").status_code == 200
    assert _setup(client, "http://ls:8080", project="2", token="token-two").status_code == 200
    assert _served(service, "1") == ("http://ls:8080", "token-one")
    assert _served(service, "2") == ("http://ls:8080", "token-two")
    assert _served(service, "3") == ("http://ls:8080", "")  # never set up: no one's token
    stolen = _setup(client, "http://ls:8080", project="1", token="attacker")
    assert stolen.status_code == 403 and "basic auth" in stolen.get_json()["error"]
    assert _served(service, "1") == ("http://ls:8080", "token-one")
    restarted, service = _client(tmp_path)  # the binding survives a restart; the token itself is not stored
    assert _setup(restarted, "http://ls:8080", project="1", token="attacker").status_code == 403
    assert "token-one" not in (tmp_path / "backend.sqlite").read_bytes().decode(errors="replace")
    client, service = _client(tmp_path / "auth", basic_auth_user="u", basic_auth_pass="p")
    assert _setup(client, "http://ls:8080", token="old", auth=("u", "p")).status_code == 200
    assert _setup(client, "http://ls:8080", token="new", auth=("u", "p")).status_code == 200
    assert _served(service) == ("http://ls:8080", "new")


def test_moving_label_studio_takes_basic_auth_or_an_allowed_host(tmp_path):
    client, service = _client(tmp_path / "a", basic_auth_user="u", basic_auth_pass="p")
    assert _setup(client, "http://ls-one:8080", auth=("u", "p")).status_code == 200
    assert _setup(client, "http://ls-two:8080").status_code == 401
    assert _setup(client, "http://ls-two:8080", auth=("u", "p")).status_code == 200
    assert _served(service) == ("http://ls-two:8080", "t")
    client, service = _client(tmp_path / "b", allowed_image_hosts=("ls-two",))
    assert _setup(client, "http://ls-one:8080").status_code == 200
    assert _setup(client, "http://ls-two:8080").status_code == 200
    assert _setup(client, "http://ls-three:8080").status_code == 403


def test_environment_label_studio_wins_and_bad_hostnames_are_refused(tmp_path):
    client, service = _client(tmp_path, label_studio_url="http://ls:8080", label_studio_api_key="K")
    assert _setup(client, "http://elsewhere").status_code == 200
    assert _served(service) is None  # the fetcher's own client, the environment's
    assert service.fetcher.label_studio.url == "http://ls:8080" and service.fetcher.label_studio.token == "K"
    client, _ = _client(tmp_path / "b")
    for bad in ("file:///etc/passwd", "http://user:pw@ls:8080", "ls:8080"):
        assert _setup(client, bad).status_code == 400, bad
