"""No password in ``queue.url``: the config refuses it (one line naming the variable to use), every
client refuses it, and the resolved config.yaml of a run holds no secret."""

from __future__ import annotations

import pytest

from common.config import load_config, save_resolved
from common.errors import ConfigError, QueueError
from common.replay import check_url, connect

SECRET = "s3cret-password-0123456789"
WITH_PASSWORD = [
    f"redis://treepo:{SECRET}@10.0.0.5:6390/0",
    f"redis://:{SECRET}@10.0.0.5:6390/0",
    f"rediss://default:{SECRET}@redis.example:6380/0",
    f"unix:///run/redis.sock?db=0&password={SECRET}",
]


@pytest.mark.parametrize("url", WITH_PASSWORD)
def test_config_refuses_a_password_in_the_url(url, monkeypatch):
    monkeypatch.delenv("TREEPO_QUEUE_URL", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.yaml", [f"queue.url={url}", "queue.password_env=MY_REDIS_PW"])
    msg = str(info.value)
    assert "queue.url" in msg and "MY_REDIS_PW" in msg and "\n" not in msg
    assert SECRET not in msg  # the message does not repeat the secret


@pytest.mark.parametrize("url", WITH_PASSWORD)
def test_clients_refuse_a_password_in_the_url(url):
    with pytest.raises(QueueError, match="must not contain a password") as info:
        connect(url)  # refused before any connection is tried
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", ["", "redis://10.0.0.5:6390/0", "redis://treepo@10.0.0.5:6390/0"])
def test_urls_without_a_password_pass(url):
    check_url(url)


def test_resolved_config_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEPO_REDIS_PASSWORD", SECRET)
    monkeypatch.delenv("TREEPO_QUEUE_URL", raising=False)
    cfg = load_config("configs/demo.yaml", ["queue.url=redis://treepo@10.0.0.5:6390/0"])
    text = save_resolved(cfg, tmp_path).read_text()
    assert "redis://treepo@10.0.0.5:6390/0" in text and "TREEPO_REDIS_PASSWORD" in text
    assert SECRET not in text
