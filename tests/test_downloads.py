"""lcm.downloads against local HTTP(S) servers: what it fetches, what it refuses, what it keeps."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import ssl
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from lcm import downloads, lora
from lcm.downloads import LoraCache
from lcm.errors import InputError, LCMError

# Made once with: openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500
#   -subj /CN=lora.test -addext subjectAltName=DNS:lora.test -addext basicConstraints=critical,CA:TRUE
#   -addext keyUsage=critical,digitalSignature,keyCertSign -keyout key.pem -out cert.pem
TLS = Path(__file__).parent / "data" / "tls"
Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A local HTTP(S) server answering each path with a route; it counts the requests to each path."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.release = threading.Event()  # lets stalled routes go at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                server.hosts.append(self.headers["Host"])
                server.routes.get(self.path, status(404))(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def body(data: bytes, length: int | None = None) -> Route:
    """200 with `data`; Content-Length `length` (default: the truth; -1: none, the close ends it)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        claimed = len(data) if length is None else length
        if claimed >= 0:
            h.send_header("Content-Length", str(claimed))
        h.end_headers()
        h.wfile.write(data)

    return route


def chunked(data: bytes, claimed: int) -> Route:
    """`data` in chunks, under a Content-Length that lies (chunked bodies ignore it)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Content-Length", str(claimed))
        h.end_headers()
        for start in range(0, len(data), 100):
            piece = data[start : start + 100]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")

    return route


def status(code: int) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def redirect(location: str, code: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def stall(server: Server) -> Route:
    """Headers and a first few bytes, then nothing until the server closes."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.wfile.flush()
        server.release.wait(10)

    return route


def trickle(server: Server) -> Route:
    """A byte every 20 ms: never silent for long, never done soon."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        while not server.release.wait(0.02):
            h.wfile.write(b"x")
            h.wfile.flush()

    return route


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def private_ok(monkeypatch):
    """The local servers are on 127.0.0.1: allowed, as the variable allows."""
    monkeypatch.setenv(downloads.ALLOW_PRIVATE_ENV, "1")


@pytest.fixture
def store(tmp_path) -> LoraCache:
    return LoraCache(tmp_path / "cache", budget_bytes=10_000_000)


@pytest.fixture
def names(monkeypatch) -> dict[str, list[str]]:
    """Host names resolved as this dict says (each lookup counted in "lookups"); others as usual."""
    table: dict[str, list[str]] = {"lookups": []}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            return real(host, port, *args, **kwargs)
        table["lookups"].append(host)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in table[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def leftovers(directory: Path) -> list[str]:
    """Files in the cache besides its index and lock: complete files and partial ones."""
    return sorted(p.name for p in directory.iterdir() if p.name not in (downloads.INDEX, downloads.LOCK))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_download_is_kept_under_its_sha256_and_a_second_fetch_costs_no_request(server, store, private_ok):
    data = os.urandom(3000)
    server.routes["/lora.safetensors"] = body(data)
    first = store.fetch(server.url("/lora.safetensors"), "lora_weights")
    assert first.path == store.directory / sha(data) and first.path.read_bytes() == data
    assert (first.sha256, first.size, first.downloaded) == (sha(data), 3000, True)
    assert first.summary().startswith("downloaded 0.003 MB in ")
    again = store.fetch(server.url("/lora.safetensors"), "lora_weights")
    assert (again.path, again.sha256, again.downloaded) == (first.path, sha(data), False)
    assert again.summary().startswith("cached 0.003 MB in ") and again.seconds < 1
    assert server.hits["/lora.safetensors"] == 1
    assert leftovers(store.directory) == [sha(data)]


def test_a_host_name_is_resolved_once_and_the_checked_address_dialled(server, store, private_ok, names):
    """lora.test resolves only through the test's table: the connection goes to what it said."""
    names["lora.test"] = ["127.0.0.1"]
    server.routes["/f"] = body(b"named")
    fetched = store.fetch(server.url("/f", host="lora.test"), "lora_weights")
    assert fetched.path.read_bytes() == b"named"
    assert names["lookups"] == ["lora.test"]
    assert server.hosts == [f"lora.test:{server.port}"]


def test_https_verifies_the_certificate_for_the_host_name_and_sends_it_as_sni(
    store, private_ok, names, monkeypatch
):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    seen: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    context.sni_callback = lambda _sock, name, _ctx: seen.append(name)
    server = Server(tls=context)
    try:
        names["lora.test"] = ["127.0.0.1"]
        names["other.test"] = ["127.0.0.1"]
        server.routes["/f"] = body(b"secure")
        with pytest.raises(InputError, match="lora.test's certificate is not valid"):
            store.fetch(server.url("/f", host="lora.test", scheme="https"), "lora_weights")  # not trusted
        monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "cert.pem"))
        fetched = store.fetch(server.url("/f", host="lora.test", scheme="https"), "lora_weights")
        assert fetched.path.read_bytes() == b"secure"
        with pytest.raises(InputError, match="other.test's certificate is not valid.*[Hh]ostname mismatch"):
            store.fetch(server.url("/f", host="other.test", scheme="https"), "lora_weights")
        assert seen == ["lora.test", "lora.test", "other.test"]
        assert server.hits["/f"] == 1
    finally:
        server.close()


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/lora.safetensors",
        "data:,abc",
        "lora.safetensors",
        "//example.com/x",
    ],
)
def test_only_http_and_https_urls_are_fetched(store, url):
    with pytest.raises(InputError, match="only http and https URLs are downloaded") as caught:
        store.fetch(url, "lora_weights")
    assert caught.value.field == "lora_weights" and caught.value.value == url
    assert str(caught.value).startswith(f"lora_weights={url!r} is not allowed: an http or https URL")
    assert not store.directory.exists()
    with pytest.raises(InputError, match="only http and https"):
        downloads.check_url(url, "lora_weights")


@pytest.mark.parametrize(
    "url, problem",
    [("http:///x", "it names no host"), ("http://example.com:99999/x", "its port is not a number")],
)
def test_a_url_without_a_host_or_with_a_bad_port_is_refused_before_any_network(url, problem):
    with pytest.raises(InputError, match=problem):
        downloads.check_url(url, "lora_weights")


@pytest.mark.parametrize(
    "host, shown",
    [
        ("127.0.0.1", "127.0.0.1 is not a public address (loopback)"),
        ("[::1]", "::1 is not a public address (loopback)"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1 is not a public address (loopback)"),
        ("10.1.2.3", "10.1.2.3 is not a public address (private)"),
        ("192.168.0.1", "192.168.0.1 is not a public address (private)"),
        ("[fd00::1]", "fd00::1 is not a public address (private)"),
        ("169.254.169.254", "169.254.169.254 is not a public address (link-local)"),
        ("[fe80::1]", "fe80::1 is not a public address (link-local)"),
        ("0.0.0.0", "0.0.0.0 is not a public address (unspecified)"),
        ("224.0.0.1", "224.0.0.1 is not a public address (multicast)"),
        ("240.0.0.1", "240.0.0.1 is not a public address (reserved)"),
        ("100.64.0.1", "100.64.0.1 is not a public address (not globally routable)"),
        ("2130706433", "2130706433 (127.0.0.1) is not a public address (loopback)"),  # as a number
        ("metadata.test", "metadata.test (169.254.169.254) is not a public address (link-local)"),
        ("mixed.test", "mixed.test (10.0.0.7) is not a public address (private)"),
    ],
)
def test_non_public_hosts_are_refused_without_the_variable(store, names, host, shown):
    names["metadata.test"] = ["169.254.169.254"]
    names["mixed.test"] = ["93.184.216.34", "10.0.0.7"]  # every address is checked, not just the first
    url = f"http://{host}/lora.safetensors"
    with pytest.raises(InputError, match=re.escape(shown)) as caught:
        store.fetch(url, "lora_weights")
    assert str(caught.value).startswith(f"lora_weights={url!r} is not allowed")
    assert "set LCM_ALLOW_PRIVATE_URLS=1" in str(caught.value)
    assert leftovers(store.directory) == []


def test_localhost_is_refused_as_it_resolves(store, server):
    server.routes["/f"] = body(b"local")
    with pytest.raises(
        InputError, match=r"localhost \((127.0.0.1|::1)\) is not a public address \(loopback\)"
    ):
        store.fetch(server.url("/f", host="localhost"), "lora_weights")
    assert server.hits["/f"] == 0


def test_private_ok_allows_a_private_host_whatever_the_variable(server, store, monkeypatch):
    """And what it fetched is no way round the check for a caller not allowed: the cache refuses too."""
    monkeypatch.setenv(downloads.ALLOW_PRIVATE_ENV, "0")
    server.routes["/f"] = body(b"operator's")
    assert store.fetch(server.url("/f"), "weights", private_ok=True).path.read_bytes() == b"operator's"
    with pytest.raises(InputError, match="loopback"):
        store.fetch(server.url("/f"), "lora_weights")
    assert store.fetch(server.url("/f"), "weights", private_ok=True).downloaded is False
    assert server.hits["/f"] == 1


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_a_bad_allow_private_value_fails_naming_the_variable(store, monkeypatch, value):
    monkeypatch.setenv(downloads.ALLOW_PRIVATE_ENV, value)
    with pytest.raises(LCMError, match=f"LCM_ALLOW_PRIVATE_URLS={value!r} is not allowed: use 1 .* or 0"):
        store.fetch("http://example.com/x", "weights", private_ok=True)


def test_redirects_are_followed_relative_or_absolute_up_to_the_limit(server, store, private_ok):
    server.routes["/file"] = body(b"at the end")
    for i in range(downloads.MAX_REDIRECTS):
        server.routes[f"/r{i}"] = redirect(
            f"/r{i + 1}" if i % 2 else server.url(f"/r{i + 1}"), downloads.REDIRECTS[i % 5]
        )
    server.routes[f"/r{downloads.MAX_REDIRECTS}"] = redirect("/file", 307)
    fetched = store.fetch(server.url("/r1"), "lora_weights")  # r1 .. r5, then the file: 5 redirects
    assert fetched.path.read_bytes() == b"at the end"
    with pytest.raises(InputError, match=f"it redirects more than {downloads.MAX_REDIRECTS} times"):
        store.fetch(server.url("/r0"), "lora_weights")  # 6 redirects
    assert server.hits["/file"] == 1


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://example.com/lora.safetensors", "gopher://x/"]
)
def test_a_redirect_to_another_scheme_is_refused(server, store, private_ok, location):
    server.routes["/go"] = redirect(location)
    with pytest.raises(
        InputError, match=f"it redirects to {re.escape(location)}: only http and https URLs"
    ) as caught:
        store.fetch(server.url("/go"), "lora_weights")
    assert caught.value.value == server.url("/go")


def test_a_redirect_to_a_non_public_host_is_refused(server, store, names, monkeypatch):
    """The first hop passes the check (127.0.0.1 counts as public here); the second does not."""
    real = downloads._non_public
    monkeypatch.setattr(downloads, "_non_public", lambda a: None if a == "127.0.0.1" else real(a))
    names["metadata.test"] = ["169.254.169.254"]
    for target, shown in [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public address (link-local)"),
        ("http://metadata.test/x", "metadata.test (169.254.169.254) is not a public address"),
        ("http://[::1]:9/x", "::1 is not a public address (loopback)"),
    ]:
        server.routes["/go"] = redirect(target)
        with pytest.raises(InputError, match=re.escape(f"it redirects to {target}: {shown}")):
            store.fetch(server.url("/go"), "lora_weights")
    server.routes["/ok"] = body(b"public")  # the patch lets the first hop through at all
    assert store.fetch(server.url("/ok"), "lora_weights").path.read_bytes() == b"public"


@pytest.mark.parametrize(
    "code, reason", [(404, "Not Found"), (500, "Internal Server Error"), (403, "Forbidden")]
)
def test_an_http_error_names_its_status(server, store, private_ok, code, reason):
    server.routes["/f"] = status(code)
    url = server.url("/f")
    with pytest.raises(
        InputError, match=f"the download failed: 127.0.0.1 answered HTTP {code} {reason}"
    ) as caught:
        store.fetch(url, "lora_weights")
    assert str(caught.value).startswith(f"lora_weights={url!r} is not allowed")
    assert leftovers(store.directory) == []


@pytest.mark.parametrize(
    "route, problem",
    [
        (body(b"x" * 1001), r"it is 0.001001 MB \(its Content-Length\), over the 0.001 MB limit"),
        (body(b"x" * 5000, length=-1), "more than 0.001 MB arrived"),  # no length: the close ends it
        (chunked(b"x" * 5000, claimed=10), "more than 0.001 MB arrived"),  # a length that lies
    ],
    ids=["content-length", "no-length", "lying-length"],
)
def test_a_file_over_the_limit_is_refused_and_nothing_is_kept(
    server, store, private_ok, monkeypatch, route, problem
):
    monkeypatch.setattr(downloads, "MAX_BYTES", 1000)
    server.routes["/big"] = route
    with pytest.raises(InputError, match=problem):
        store.fetch(server.url("/big"), "lora_weights")
    assert leftovers(store.directory) == []
    server.routes["/small"] = chunked(b"y" * 1000, claimed=10)  # at the limit, chunked: fine
    assert store.fetch(server.url("/small"), "lora_weights").size == 1000


def test_a_connection_that_closes_early_leaves_no_complete_file(server, store, private_ok):
    server.routes["/cut"] = body(b"x" * 500, length=1000)
    with pytest.raises(
        InputError, match="the download failed: the connection closed after 500 of 1000 bytes"
    ):
        store.fetch(server.url("/cut"), "lora_weights")
    assert leftovers(store.directory) == []
    assert json.loads((store.directory / downloads.INDEX).read_text()) == {
        "files": {},
        "urls": {},
        "private": [],
    }


def test_a_stalled_server_fails_on_the_read_timeout(server, store, private_ok, monkeypatch):
    monkeypatch.setattr(downloads, "READ_TIMEOUT_S", 0.3)
    server.routes["/stall"] = stall(server)
    start = time.monotonic()
    with pytest.raises(InputError, match="the download failed: 127.0.0.1 sent nothing for 0.3 s"):
        store.fetch(server.url("/stall"), "lora_weights")
    assert time.monotonic() - start < 3
    assert leftovers(store.directory) == []


def test_a_trickling_server_fails_on_the_deadline(server, store, private_ok, monkeypatch):
    monkeypatch.setattr(downloads, "DEADLINE_S", 0.3)
    server.routes["/slow"] = trickle(server)
    start = time.monotonic()
    with pytest.raises(InputError, match="the download failed: it took over 0.3 s"):
        store.fetch(server.url("/slow"), "lora_weights")
    assert time.monotonic() - start < 3
    assert leftovers(store.directory) == []


def test_a_refused_connection_says_so(store, private_ok):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: the connection is refused
        with pytest.raises(InputError, match=f"the download failed: could not connect to 127.0.0.1:{port}"):
            store.fetch(f"http://127.0.0.1:{port}/x", "lora_weights")


def test_the_budget_evicts_the_least_recently_used_and_never_the_file_just_fetched(
    server, tmp_path, private_ok
):
    store = LoraCache(tmp_path / "cache", budget_bytes=250)
    files = {name: bytes([i]) * 100 for i, name in enumerate("abcd")}
    files["big"] = b"B" * 300
    for name, data in files.items():
        server.routes[f"/{name}"] = body(data)

    def fetch(name: str) -> bool:
        return store.fetch(server.url(f"/{name}"), "lora_weights").downloaded

    assert [fetch("a"), fetch("b"), fetch("a")] == [True, True, False]  # b is now the least recent
    assert fetch("c") is True  # 300 bytes: b goes
    assert leftovers(store.directory) == sorted(sha(files[n]) for n in "ac")
    assert [fetch("a"), fetch("c"), fetch("b")] == [False, False, True]  # a goes, b back
    assert leftovers(store.directory) == sorted(sha(files[n]) for n in "bc")
    assert fetch("big") is True  # alone over the budget: everything else goes, it stays
    assert leftovers(store.directory) == [sha(files["big"])]
    assert fetch("big") is False
    index = json.loads((store.directory / downloads.INDEX).read_text())
    assert index["files"] == {sha(files["big"]): 300} and index["urls"] == {
        server.url("/big"): sha(files["big"])
    }
    assert index["private"] == [server.url("/big")]  # 127.0.0.1, which the variable allowed


def test_one_file_under_two_urls_is_kept_once(server, store, private_ok):
    server.routes["/one"] = server.routes["/two"] = body(b"same")
    a, b = (store.fetch(server.url(p), "lora_weights") for p in ("/one", "/two"))
    assert a.path == b.path and leftovers(store.directory) == [sha(b"same")]


def test_the_index_survives_a_new_cache_object_and_a_corrupt_one_is_rebuilt_from_the_files(
    server, tmp_path, private_ok
):
    directory = tmp_path / "cache"
    a, b, c = b"a" * 100, b"b" * 100, b"c" * 100
    server.routes.update({"/a": body(a), "/b": body(b), "/c": body(c)})
    LoraCache(directory, 250).fetch(server.url("/a"), "lora_weights")
    LoraCache(directory, 250).fetch(server.url("/b"), "lora_weights")
    assert LoraCache(directory, 250).fetch(server.url("/a"), "lora_weights").downloaded is False
    assert server.hits["/a"] == 1

    os.utime(directory / sha(b), (1, 1))  # b the older by its file, a the newer
    (directory / downloads.INDEX).write_text('{"files": [1, 2')
    fresh = LoraCache(directory, 250)
    assert fresh.fetch(server.url("/c"), "lora_weights").downloaded is True
    # The URLs were lost with the index, but a and b still counted: 300 bytes, so the older, b, went.
    assert leftovers(directory) == sorted([sha(a), sha(c)])
    assert fresh.fetch(server.url("/a"), "lora_weights").downloaded is True  # its URL forgotten, one download
    assert server.hits["/a"] == 2 and leftovers(directory) == sorted([sha(a), sha(c)])


def test_an_index_entry_whose_file_changed_size_is_dropped_with_its_file(server, store, private_ok):
    server.routes["/a"] = body(b"a" * 100)
    first = store.fetch(server.url("/a"), "lora_weights")
    first.path.write_bytes(b"a" * 50)  # truncated behind the cache's back
    again = store.fetch(server.url("/a"), "lora_weights")
    assert again.downloaded is True and again.path.read_bytes() == b"a" * 100


def test_a_stale_partial_file_is_removed_and_a_live_one_left(server, store, private_ok):
    store.directory.mkdir(parents=True)
    stale, live = store.directory / f".dead{downloads.PARTIAL}", store.directory / f".live{downloads.PARTIAL}"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    old = time.time() - downloads.DEADLINE_S - downloads.READ_TIMEOUT_S - 1
    os.utime(stale, (old, old))
    server.routes["/f"] = body(b"f")
    store.fetch(server.url("/f"), "lora_weights")
    assert leftovers(store.directory) == sorted([live.name, sha(b"f")])


def test_an_expected_sha256_is_served_from_the_cache_or_fetched_again_and_a_change_refused(
    server, store, private_ok
):
    url = server.url("/f")
    server.routes["/f"] = body(b"version 1")
    store.fetch(url, "lora_weights")
    server.routes["/f"] = body(b"version 2")
    hit = store.fetch(url, "lora_weights", sha256=sha(b"version 1"))
    assert (hit.downloaded, hit.path.read_bytes()) == (False, b"version 1")
    moved = store.fetch(url, "lora_weights", sha256=sha(b"version 2"))  # cached 1, asked 2: fetched again
    assert (moved.downloaded, moved.path.read_bytes()) == (True, b"version 2")
    server.routes["/f"] = body(b"version 3")
    with pytest.raises(InputError, match="the file at this URL has changed") as caught:
        store.fetch(url, "lora_weights", sha256=sha(b"version 1"))
    assert f"sha256 is {sha(b'version 1')}" in str(caught.value)
    assert f"its sha256 is now {sha(b'version 3')}" in str(caught.value)
    assert str(caught.value).startswith(f"lora_weights={url!r}")
    assert store.fetch(url, "lora_weights").path.read_bytes() == b"version 3"  # what the URL now holds
    assert server.hits["/f"] == 3


def test_threads_sharing_the_cache_keep_its_index_whole(server, tmp_path, private_ok):
    store = LoraCache(tmp_path / "cache", budget_bytes=300)
    bodies = {f"/{i}": bytes([i]) * 100 for i in range(12)}
    for path, data in bodies.items():
        server.routes[path] = body(data)
    results, errors = {}, []

    def fetch(path: str) -> None:
        try:
            results[path] = LoraCache(store.directory, 300).fetch(server.url(path), "lora_weights").sha256
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(p,)) for p in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == {p: sha(d) for p, d in bodies.items()}
    index = json.loads((store.directory / downloads.INDEX).read_text())
    assert sorted(index["files"]) == leftovers(store.directory) and len(index["files"]) == 3
    assert sorted(index["urls"].values()) == sorted(index["files"])  # no file lost its URL
    assert all(sha(bodies["/" + url.rsplit("/", 1)[1]]) == s for url, s in index["urls"].items())


def test_the_cache_the_environment_names(tmp_path, monkeypatch):
    monkeypatch.delenv(downloads.CACHE_ENV, raising=False)
    monkeypatch.delenv(downloads.CACHE_MB_ENV, raising=False)
    default = downloads.cache()
    assert (default.directory, default.budget_bytes) == (
        downloads.DEFAULT_CACHE,
        downloads.DEFAULT_CACHE_MB * 10**6,
    )
    monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "loras"))
    monkeypatch.setenv(downloads.CACHE_MB_ENV, "7")
    named = downloads.cache()
    assert (named.directory, named.budget_bytes) == ((tmp_path / "loras").resolve(), 7_000_000)
    assert not named.directory.exists()  # made on first use, not by asking


@pytest.mark.parametrize("value", ["ten", "-5", "1.5", " 7", "1e3"])
def test_a_bad_cache_budget_fails_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(downloads.CACHE_MB_ENV, value)
    with pytest.raises(
        LCMError, match=f"LCM_LORA_CACHE_MB={value!r} is not allowed: use a whole number of MB"
    ):
        downloads.cache()


def test_a_cache_directory_that_cannot_be_made_fails_naming_the_variable(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_bytes(b"")
    monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "a-file"))
    with pytest.raises(
        LCMError, match=r"the LoRA cache '.*a-file' cannot be used .*set LCM_LORA_CACHE to a writable"
    ):
        downloads.download("http://example.com/x", "lora_weights")


def test_a_downloaded_training_archive_gives_its_safetensors(server, tmp_path, private_ok, monkeypatch):
    """The request path: lora_weights fetched through the cache, then the LoRA taken out of the tar."""
    monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "cache"))
    save_file({"unet.a.lora_A.weight": torch.ones(2, 2)}, tmp_path / lora.WEIGHTS_FILE)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tf:
        tf.add(tmp_path / lora.WEIGHTS_FILE, lora.WEIGHTS_FILE)
    server.routes["/lora.tar"] = body(archive.getvalue())
    server.routes["/bare"] = body((tmp_path / lora.WEIGHTS_FILE).read_bytes())
    server.routes["/not"] = body(b"\x80\x04K\x01.")
    fetched = downloads.download(server.url("/lora.tar"), "lora_weights")
    path = lora.safetensors_in(fetched.path, tmp_path / "scratch", "lora_weights", server.url("/lora.tar"))
    assert path == tmp_path / "scratch" / lora.WEIGHTS_FILE
    assert path.read_bytes() == (tmp_path / lora.WEIGHTS_FILE).read_bytes()
    bare = downloads.download(server.url("/bare"), "lora_weights").path
    assert lora.safetensors_in(bare, tmp_path / "scratch", "lora_weights") == bare
    not_lora = downloads.download(server.url("/not"), "lora_weights").path
    with pytest.raises(InputError, match=r"lora_weights='http.*/not' is not allowed: .*not safetensors"):
        lora.safetensors_in(not_lora, tmp_path / "scratch", "lora_weights", server.url("/not"))
