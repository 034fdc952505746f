"""The listening socket `stillhouse up` hands each gateway it starts (serving/listener.py)."""

from __future__ import annotations

import socket

import pytest

from stillhouse.common.config import env_overrides, load_settings
from stillhouse.common.errors import UsageError
from stillhouse.serving.listener import LISTEN_FD_ENV, bind_listener, inherited_listener


def test_no_variable_means_no_inherited_socket():
    assert inherited_listener({}) is None
    assert inherited_listener({LISTEN_FD_ENV: ""}) is None


def test_the_handed_socket_is_the_one_bound_and_children_inherit_it():
    listener = bind_listener("127.0.0.1", 0)
    try:
        assert listener.get_inheritable()
        got = inherited_listener({LISTEN_FD_ENV: str(listener.fileno())})
        assert got is not None and got.getsockname() == listener.getsockname()
        got.detach()  # the same fd: closed once, below
    finally:
        listener.close()


def test_a_port_in_use_is_a_usage_error_that_names_it():
    first = bind_listener("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(UsageError, match=f"127.0.0.1:{port}"):
            bind_listener("127.0.0.1", port)
    finally:
        first.close()


def test_a_variable_that_names_no_socket_is_a_usage_error():
    with pytest.raises(UsageError, match="not an open socket"):
        inherited_listener({LISTEN_FD_ENV: "not-a-number"})


def test_a_socket_that_does_not_listen_is_refused_and_left_open():
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(UsageError, match="not a listening TCP socket"):
            inherited_listener({LISTEN_FD_ENV: str(plain.fileno())})
        assert plain.fileno() != -1  # still ours: the check closed nothing
        plain.getsockname()  # raises on a closed socket
    finally:
        plain.close()


def test_the_variable_is_not_read_as_a_config_override(tmp_path, monkeypatch):
    # A restarted gateway once refused to start: "gateway_fd: Extra inputs are not permitted".
    monkeypatch.chdir(tmp_path)
    assert env_overrides({LISTEN_FD_ENV: "7"}) == {}
    assert load_settings(None, {LISTEN_FD_ENV: "7"}).gateway == load_settings(None, {}).gateway
