"""Coordinator URLs and paths: what parses, what is refused and how the message says so (pure)."""

from __future__ import annotations

import pytest

from twinproxy.coordinator import (
    Conflict,
    CoordinatorError,
    Node,
    Unavailable,
    check_path,
    connect,
    direct_children,
    parse_url,
)
from twinproxy.coordinator.etcd_keys import b64, prefix_end, unb64
from twinproxy.coordinator.filestore import node_name, node_path


def test_zookeeper_url_with_hosts_chroot_and_options():
    parsed = parse_url("zookeeper://h1:2181,h2:2182,h3/twinproxy/prod?session_timeout=4&timeout=1.5")
    assert parsed.scheme == "zookeeper"
    assert parsed.hosts == (("h1", 2181), ("h2", 2182), ("h3", 2181))
    assert parsed.root == "/twinproxy/prod"
    assert parsed.session_timeout == 4.0 and parsed.timeout == 1.5
    assert parsed.host_list == "h1:2181,h2:2182,h3:2181"
    assert parsed.display == "zookeeper://h1:2181,h2:2182,h3:2181/twinproxy/prod"


def test_etcd_url_defaults_and_ipv6():
    parsed = parse_url("etcd://[::1]:2379,127.0.0.1")
    assert parsed.hosts == (("::1", 2379), ("127.0.0.1", 2379))
    assert parsed.root == ""
    assert parsed.session_timeout == 10.0 and parsed.timeout == 5.0
    assert parsed.display == "etcd://[::1]:2379,127.0.0.1:2379"
    assert parse_url("etcd://h/prefix/").root == "/prefix"  # a trailing slash means nothing


def test_file_url():
    parsed = parse_url("file:///var/lib/twinproxy/coord?session_timeout=2")
    assert parsed.scheme == "file" and parsed.root == "/var/lib/twinproxy/coord" and parsed.hosts == ()
    assert parsed.display == "file:///var/lib/twinproxy/coord"
    assert parse_url("file://localhost/tmp/x%20y").root == "/tmp/x y"


def test_credentials_never_shown():
    parsed = parse_url("etcd://alice:s3cret@h1:2379/p")
    assert (parsed.username, parsed.password) == ("alice", "s3cret")
    assert parsed.display == "etcd://alice@h1:2379/p"
    assert "s3cret" not in repr(parsed)
    with pytest.raises(ValueError) as caught:
        parse_url("etcd://alice:s3cret@h1:99999/p")
    assert "s3cret" not in str(caught.value) and "alice@h1:99999" in str(caught.value)


@pytest.mark.parametrize("url, words", [
    ("redis://h:1/x", "unknown scheme 'redis'"),
    ("localhost:2181", "is not a URL"),
    ("zookeeper://h:abc/x", "bad port 'abc'"),
    ("zookeeper://h:0/x", "bad port"),
    ("etcd://:2379/x", "empty host"),
    ("etcd://h1,,h2/x", "empty host"),
    ("etcd://[::1/x", "bad host"),
    ("etcd://h/a//b", "bad root"),
    ("zookeeper://h/a/../b", "bad root"),
    ("etcd://h/x?ttl=3", "unknown option 'ttl'"),
    ("etcd://h/x?timeout=0", "timeout must be a number of seconds"),
    ("etcd://h/x?session_timeout=soon", "session_timeout must be a number of seconds"),
    ("etcd://h/x#frag", "fragment"),
    ("file://host/dir", "names no host"),
    ("file:relative/dir", "is not a URL"),
    ("etcd://alice@h/x", "user:password@"),
])
def test_bad_urls_say_what_is_wrong(url, words):
    with pytest.raises(ValueError) as caught:
        parse_url(url)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_connect_refuses_a_bad_url_before_doing_anything():
    with pytest.raises(ValueError, match="unknown scheme"):
        connect("consul://h/x", reactor=None)


@pytest.mark.parametrize("path", ["/a", "/a/b", "/clusters/shop/proxies/127.0.0.1:19000-4242", "/.hidden"])
def test_good_paths(path):
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["", "a", "a/b", "/a/", "//a", "/a//b", "/./a", "/a/..", "/a\0b", None, b"/a"])
def test_bad_paths(path):
    with pytest.raises(ValueError):
        check_path(path)


def test_root_only_where_allowed():
    assert check_path("/", allow_root=True) == "/"
    with pytest.raises(ValueError, match="root"):
        check_path("/")


def test_errors_are_one_line_and_name_url_operation_path():
    error = Conflict("etcd://h:2379/p", "set", "/a/b", "version moved\non")
    assert str(error) == "etcd://h:2379/p: set /a/b: version moved on"
    assert isinstance(error, CoordinatorError) and (error.url, error.operation, error.path) == (
        "etcd://h:2379/p", "set", "/a/b")
    assert issubclass(Unavailable, CoordinatorError)


def test_direct_children_lists_implied_parents():
    nodes = {"/a/b": Node(b"1", 5), "/a/c/d": Node(b"2", 6), "/a/c": Node(b"3", 7), "/a/e/f/g": Node(b"", 8),
             "/ab": Node(b"x", 9)}
    assert direct_children("/a", nodes) == {"b": Node(b"1", 5), "c": Node(b"3", 7), "e": Node(b"", 0)}
    assert direct_children("/", nodes) == {"a": Node(b"", 0), "ab": Node(b"x", 9)}


def test_file_node_names_round_trip_and_stay_flat():
    for path in ("/clusters/shop/topology", "/a%2Fb/c", "/ünï/cödé", "/x:1-2"):
        name = node_name(path)
        assert "/" not in name and node_path(name) == path
    assert node_name("/clusters/shop/topology") == "clusters%2Fshop%2Ftopology"
    assert node_path("%2F%2Fbad") is None


def test_etcd_key_encodings():
    assert prefix_end(b"/t/") == b"/t0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert unb64(b64(b"\x00\xffvalue")) == b"\x00\xffvalue" and unb64(None) == b""
