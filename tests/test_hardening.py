"""The hardening list, item by item, against real backend processes on loopback (bench/attack.py),
and the policy for Label Studio's address learnt from /setup, in process."""
import pytest

from backend.app import create_app
from backend.service import SegmentationService
from backend.settings import Settings
from bench.attack import ATTACKS, lab_session

SCHEMA = '<View><Image name="i" value="$i"/><BrushLabels name="m" toName="i"><Label value="a"/></BrushLabels></View>'


@pytest.mark.parametrize("attack", ATTACKS, ids=[f"{n}-{a.__name__}" for n, a in enumerate(ATTACKS, 1)])
def test_attack_is_held(attack):
    with lab_session() as lab:
        outcome = attack(lab)
    if outcome.startswith("skipped"):
        pytest.skip(outcome)


def _client(tmp_path, **settings):
    service = SegmentationService(Settings(model_dir=tmp_path, **settings), model_loader=None)
    return create_app(service.settings, service).test_client(), service


def _setup(client, host, **kwargs):
    return client.post("/setup", json={"schema": SCHEMA, "hostname": host, "access_token": "t"}, **kwargs)


def test_first_label_studio_is_trusted_and_remembered(tmp_path):
    client, service = _client(tmp_path, label_studio_api_key="K")
    assert _setup(client, "http://10.0.0.5:8080").status_code == 200
    assert service.fetcher.label_studio_url == "http://10.0.0.5:8080" and service.fetcher.label_studio.token == "t"
    assert _setup(client, "http://10.0.0.6:8080").status_code == 403
    restarted, _ = _client(tmp_path)
    assert _setup(restarted, "http://10.0.0.6:8080").status_code == 403  # the trust survives a restart
    assert _setup(restarted, "http://10.0.0.5:8080").status_code == 200


def test_moving_label_studio_takes_basic_auth_or_an_allowed_host(tmp_path):
    client, service = _client(tmp_path / "a", basic_auth_user="u", basic_auth_pass="p")
    assert _setup(client, "http://ls-one:8080", auth=("u", "p")).status_code == 200
    assert _setup(client, "http://ls-two:8080").status_code == 401
    assert _setup(client, "http://ls-two:8080", auth=("u", "p")).status_code == 200
    assert service.fetcher.label_studio_url == "http://ls-two:8080"
    client, service = _client(tmp_path / "b", allowed_image_hosts=("ls-two",))
    assert _setup(client, "http://ls-one:8080").status_code == 200
    assert _setup(client, "http://ls-two:8080").status_code == 200
    assert _setup(client, "http://ls-three:8080").status_code == 403


def test_environment_label_studio_wins_and_bad_hostnames_are_refused(tmp_path):
    client, service = _client(tmp_path, label_studio_url="http://ls:8080", label_studio_api_key="K")
    assert _setup(client, "http://elsewhere").status_code == 200
    assert service.fetcher.label_studio_url == "http://ls:8080" and service.fetcher.label_studio.token == "K"
    client, _ = _client(tmp_path / "b")
    for bad in ("file:///etc/passwd", "http://user:pw@ls:8080", "ls:8080"):
        assert _setup(client, bad).status_code == 400, bad
