"""The admin API on a port of its own, on a real `stillhouse serve`: the client port answers
404 for /admin/*, the admin port serves it (with the admin key), and clients keep their port."""

from __future__ import annotations

import httpx
import pytest
from clients import ask
from serve_process import ADMIN_KEY

from stillhouse.serving.engines.vllm import free_port

pytestmark = pytest.mark.slow


def test_the_admin_api_answers_only_on_its_own_port(faulty_gateway):
    admin_port = free_port()
    gp, _ = faulty_gateway(admin_port=admin_port)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    on_client_port = httpx.get(gp.url + "/admin/ab", headers=admin, timeout=5)
    assert on_client_port.status_code == 404
    assert on_client_port.json()["error"]["type"] == "not_found_error"
    on_admin_port = httpx.get(f"http://127.0.0.1:{admin_port}/admin/ab", headers=admin, timeout=5)
    assert on_admin_port.status_code == 200 and "challenger_share" in on_admin_port.json()
    assert ask(gp.url, stream=False).status == 200
