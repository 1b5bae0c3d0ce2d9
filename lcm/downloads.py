"""Fetching a URL that a request or setup names, safely, and keeping what was fetched.

A LoRA arrives as an http(s) URL: a request's `lora_weights` (Hugging Face, Civitai, a Replicate
training's output) or setup's `weights` (COG_WEIGHTS). Whoever sends the URL picks the server, so
the download is bounded in every way a server could abuse: http and https only, at most MAX_BYTES,
connect, read and whole-download timeouts, at most MAX_REDIRECTS redirects, each checked like the
URL itself, and no loopback, private, link-local or otherwise non-public host (the service's own
network, a cloud's metadata endpoint) unless LCM_ALLOW_PRIVATE_URLS=1 or the caller allows it.
A host name is resolved once, every address checked, and the connection made to a checked
address, so a second DNS answer cannot point it elsewhere (DNS rebinding); https still verifies
the certificate for, and sends SNI of, the name.

    LCM_ALLOW_PRIVATE_URLS=1  download from non-public hosts too (the tests' local servers)
    LCM_LORA_CACHE=DIR        where fetched files are kept (default: .cache/loras at the project root)
    LCM_LORA_CACHE_MB=N       the cache's budget in MB, oldest out first (default: DEFAULT_CACHE_MB)

What was fetched stays in a cache on disk (LoraCache), named by its sha256: a repeated URL costs
no download. The cache takes a URL to name fixed content (a Replicate training's output does; a
Hugging Face `resolve/main/` URL may change): ask with `sha256=` to have a changed file refused.
This module logs nothing: Fetched says what happened (downloaded or cached, how long) for the
caller's own line, one per prediction.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from lcm.errors import InputError, LCMError

# A rank-128 LoRA on every layer the trainer adapts is ~400 MB in fp32 (lcm.training); SD 1.5 LoRAs
# shared online are 10-150 MB. The limit bounds a download and a file unpacked from a training's tar.
MAX_BYTES = 2_000_000_000
# A reachable host completes a TCP and TLS handshake in well under a second; 10 s leaves room for a
# lost SYN resent (after 1 s, then 3 s more) and still fails soon on a host that drops packets.
CONNECT_TIMEOUT_S = 10.0
# Silence allowed between two reads: a CDN fetching a cold object from its storage (Hugging Face's
# LFS, Civitai's bucket, replicate.delivery) may take seconds to send its first byte; a minute of
# silence is a stalled server. setup's download used the same 60 s before this module.
READ_TIMEOUT_S = 60.0
# The whole download: MAX_BYTES at 2.2 MB/s. Without it a server trickling a byte a minute would hold
# the caller (for a request, the engine thread every prediction waits on) as long as it liked.
DEADLINE_S = 900.0
MAX_REDIRECTS = 5  # Hugging Face and Civitai redirect once or twice, to their storage
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 20  # the most one read takes from the socket
USER_AGENT = "lcm-cog"
# Characters left as they are when a path and query go on the request line (the rest percent-encoded).
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"

ALLOW_PRIVATE_ENV = "LCM_ALLOW_PRIVATE_URLS"
CACHE_ENV = "LCM_LORA_CACHE"
CACHE_MB_ENV = "LCM_LORA_CACHE_MB"
# Beside lcm.compiling's and lcm.openvino_runtime's caches (.cache/ is ignored by git and by
# .dockerignore): on the container's disk, where the temp directory may be a RAM disk, and kept
# across restarts of the service.
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "loras"
# 25 LoRAs at 150 MB, or two at MAX_BYTES; a tenth of a 40 GB container disk, beside a checkpoint
# of about 4 GB (and the compile caches).
DEFAULT_CACHE_MB = 4000
INDEX = "index.json"
LOCK = ".lock"
PARTIAL = ".partial"  # a download in progress: tempfile's name with this suffix, in the cache
_CONTENT_NAME = re.compile(r"[0-9a-f]{64}")  # a complete file, named by its sha256


def _mb(n: int) -> str:
    return f"{n / 1_000_000:g} MB"


def allow_private_urls() -> bool:
    """LCM_ALLOW_PRIVATE_URLS: 1 or 0 (default 0). Strict, as befits a security switch."""
    value = os.environ.get(ALLOW_PRIVATE_ENV, "")
    if value not in ("", "0", "1"):
        raise LCMError(
            f"{ALLOW_PRIVATE_ENV}={value!r} is not allowed: use 1 (download from loopback, private and "
            "link-local hosts too) or 0"
        )
    return value == "1"


def _non_public(address: str) -> Optional[str]:
    """What kind of address this is when it is not a public one (loopback, private, ...), else None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    kinds = [
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not globally routable"),
    ]
    return next((kind for found, kind in kinds if found), None)


class _CheckedConnection(http.client.HTTPConnection):
    """HTTP, or HTTPS with `tls`, dialled to addresses already checked instead of to what the name
    resolves to at connect time; TLS verifies the certificate for, and sends SNI of, the name."""

    def __init__(self, host: str, port: int, addresses: list[str], tls: Optional[ssl.SSLContext]) -> None:
        super().__init__(host, port, timeout=READ_TIMEOUT_S)
        self.default_port = 443 if tls else 80  # the Host header leaves out the scheme's own port
        self.addresses = addresses
        self.tls = tls

    def connect(self) -> None:
        failure: OSError = OSError(f"{self.host} has no address")
        for address in self.addresses:
            try:
                sock = socket.create_connection((address, self.port), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                failure = exc
                continue
            try:
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                sock.settimeout(self.timeout)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return
        raise failure


class _Download:
    """One download: the URL asked for, the field it came in (named in every error), its limits."""

    def __init__(self, url: str, field: str, private_ok: bool) -> None:
        self.url = url
        self.field = field
        self.private_ok = private_ok
        self.reached_private = False  # some hop went to a non-public host (private_ok allowed it)
        self.deadline = time.monotonic() + DEADLINE_S

    def fail(self, problem: str, hop: Optional[str] = None) -> InputError:
        via = f"it redirects to {hop}: " if hop is not None and hop != self.url else ""
        allowed = f"an http or https URL of a file of at most {_mb(MAX_BYTES)}"
        return InputError(self.field, self.url, f"{allowed}; {via}{problem}")

    def failed(self, problem: str, hop: str) -> InputError:
        """A download that went wrong on the way (the server, the network), not a refused one."""
        return self.fail(f"the download failed: {problem}", hop)

    def parse(self, hop: str) -> tuple[SplitResult, str, int]:
        """The URL's parts, host and port; refused unless http(s) with a host. No network."""
        parts = urlsplit(hop)
        if parts.scheme.lower() not in ("http", "https"):
            raise self.fail("only http and https URLs are downloaded", hop)
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise self.fail("its port is not a number from 0 to 65535", hop) from None
        if not host:
            raise self.fail("it names no host", hop)
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise self.fail(f"{host!r} is not a valid host name", hop) from None
        return parts, host, port if port is not None else (443 if parts.scheme.lower() == "https" else 80)

    def into(self, out: BinaryIO) -> tuple[str, int]:
        """Write the file into `out`, following redirects; its sha256 and size."""
        hop = self.url
        for _ in range(MAX_REDIRECTS + 1):
            connection = self.connect(hop)
            try:
                response = self.get(connection, hop)
                if response.status not in REDIRECTS:
                    return self.save(response, out, hop)
                location = response.getheader("Location")
                if not location:
                    raise self.fail(f"HTTP {response.status} redirects without a Location", hop)
                hop = urljoin(hop, location)
            finally:
                connection.close()
        raise self.fail(f"it redirects more than {MAX_REDIRECTS} times")

    def connect(self, hop: str) -> _CheckedConnection:
        parts, host, port = self.parse(hop)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise self.failed(f"the host {host} does not resolve ({exc})", hop) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            kind = _non_public(address)
            if kind is not None and self.private_ok:
                self.reached_private = True
            elif kind is not None:
                shown = address if address == host else f"{host} ({address})"
                raise self.fail(
                    f"{shown} is not a public address ({kind}); set {ALLOW_PRIVATE_ENV}=1 to download "
                    "from non-public hosts",
                    hop,
                )
        tls = ssl.create_default_context() if parts.scheme.lower() == "https" else None
        connection = _CheckedConnection(host, port, addresses, tls)
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as exc:
            raise self.failed(f"{host}'s certificate is not valid ({exc.verify_message})", hop) from None
        except TimeoutError:
            raise self.failed(f"{host} did not answer within {CONNECT_TIMEOUT_S:g} s", hop) from None
        except OSError as exc:
            raise self.failed(f"could not connect to {host}:{port} ({exc})", hop) from None
        return connection

    @contextmanager
    def reading(self, hop: str) -> Iterator[None]:
        """Errors while talking to the server, said as what went wrong."""
        host = urlsplit(hop).hostname
        try:
            yield
        except TimeoutError:
            raise self.failed(f"{host} sent nothing for {READ_TIMEOUT_S:g} s", hop) from None
        except http.client.HTTPException as exc:
            raise self.failed(f"{host}'s answer is not HTTP ({exc!r})", hop) from None
        except OSError as exc:
            raise self.failed(f"the connection to {host} broke ({exc})", hop) from None

    def get(self, connection: _CheckedConnection, hop: str) -> http.client.HTTPResponse:
        parts = urlsplit(hop)
        target = quote(parts.path or "/", safe=_URL_SAFE) + (
            f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else ""
        )
        with self.reading(hop):
            connection.request(
                "GET", target, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            )
            return connection.getresponse()

    def save(self, response: http.client.HTTPResponse, out: BinaryIO, hop: str) -> tuple[str, int]:
        host = urlsplit(hop).hostname
        if response.status != 200:
            raise self.failed(f"{host} answered HTTP {response.status} {response.reason}", hop)
        declared = response.length  # Content-Length, or None (absent, or the body is chunked)
        if declared is not None and declared > MAX_BYTES:
            raise self.fail(
                f"it is {_mb(declared)} (its Content-Length), over the {_mb(MAX_BYTES)} limit", hop
            )
        digest, size = hashlib.sha256(), 0
        while True:
            with self.reading(hop):
                chunk = response.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BYTES:
                raise self.fail(f"more than {_mb(MAX_BYTES)} arrived, over the limit", hop)
            if time.monotonic() > self.deadline:
                raise self.failed(f"it took over {DEADLINE_S:g} s", hop)
            digest.update(chunk)
            out.write(chunk)
        if declared is not None and size < declared:
            raise self.failed(f"the connection closed after {size} of {declared} bytes", hop)
        return digest.hexdigest(), size


def check_url(url: str, field: str) -> None:
    """Refuse, with InputError naming `field`, a URL that is not http(s) with a host; no network.

    For the boundary, so that a request with such a URL fails before it queues for the engine.
    """
    _Download(url, field, private_ok=False).parse(url)


@dataclass(frozen=True)
class Fetched:
    """A file in the cache, named by its sha256, and how it got there (for the caller's log line).

    The file stays until a later fetch evicts it: read it (or load it) before fetching the next.
    """

    path: Path
    sha256: str
    size: int
    downloaded: bool  # False: the cache had it
    seconds: float

    def summary(self) -> str:
        how = "downloaded" if self.downloaded else "cached"
        return f"{how} {_mb(self.size)} in {self.seconds:.2f} s sha256={self.sha256[:12]}"


@dataclass
class _Index:
    """The cache's contents: files by sha256 (their sizes), least recently used first; URLs to files;
    the URLs whose download reached a non-public host, served from the cache only where allowed."""

    files: dict[str, int] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, directory: Path) -> _Index:
        """The index as saved, reconciled with the files there: a missing or corrupt index starts
        empty, and files it does not list count toward the budget all the same, oldest first."""
        try:
            saved = json.loads((directory / INDEX).read_text())
            files = {str(sha): int(size) for sha, size in saved["files"].items()}
            urls = {str(url): str(sha) for url, sha in saved["urls"].items()}
            private = {str(url) for url in saved["private"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            files, urls, private = {}, {}, set()
        on_disk = {p.name: p.stat() for p in directory.iterdir() if _CONTENT_NAME.fullmatch(p.name)}
        for sha, size in files.items():
            if sha in on_disk and on_disk[sha].st_size != size:  # not the file that was hashed
                (directory / sha).unlink()
                del on_disk[sha]
        known = {sha: size for sha, size in files.items() if sha in on_disk}
        unknown = sorted(set(on_disk) - set(known), key=lambda sha: on_disk[sha].st_mtime)
        index = cls({**{sha: on_disk[sha].st_size for sha in unknown}, **known})
        index.urls = {url: sha for url, sha in urls.items() if sha in index.files}
        index.private = private & set(index.urls)
        return index

    def used(self, sha: str, size: int) -> None:
        self.files.pop(sha, None)
        self.files[sha] = size

    def evict(self, directory: Path, budget: int, keep: str) -> None:
        """Least recently used files out until the rest fit `budget`; never `keep`."""
        total = sum(self.files.values())
        for sha in [s for s in self.files if s != keep]:
            if total <= budget:
                break
            (directory / sha).unlink(missing_ok=True)
            total -= self.files.pop(sha)
        self.urls = {url: sha for url, sha in self.urls.items() if sha in self.files}
        self.private &= set(self.urls)

    def save(self, directory: Path) -> None:
        """Written whole, then renamed over the old one: a crash leaves one or the other."""
        partial = directory / f".{INDEX}{PARTIAL}"
        partial.write_text(
            json.dumps({"files": self.files, "urls": self.urls, "private": sorted(self.private)}, indent=1)
        )
        os.replace(partial, directory / INDEX)


def _remove_stale_partials(directory: Path) -> None:
    """Partial files of downloads that died with their process (a live one ends within DEADLINE_S and
    one read of its start, and its file is no older): they would hold disk outside the budget."""
    stale = time.time() - (DEADLINE_S + READ_TIMEOUT_S)
    for path in directory.glob(f".*{PARTIAL}"):
        try:
            if path.stat().st_mtime < stale:
                path.unlink()
        except FileNotFoundError:  # finished or failed meanwhile
            pass


class LoraCache:
    """Fetched files in `directory`, named by sha256; an index mapping URLs to them; at most
    `budget_bytes` in all, least recently used out first (the file just fetched always stays).

    Each operation holds an exclusive lock on the directory (flock, so threads and processes alike
    wait their turn) and reads the index afresh: two LoraCache objects on one directory agree.
    Downloads run outside the lock, into partial files renamed in place under it.
    """

    def __init__(self, directory: str | os.PathLike, budget_bytes: int) -> None:
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes

    @contextmanager
    def _locked(self) -> Iterator[_Index]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / LOCK, "a")
        except OSError as exc:
            raise LCMError(
                f"the LoRA cache {str(self.directory)!r} cannot be used ({exc}): set {CACHE_ENV} to a "
                "writable directory"
            ) from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            _remove_stale_partials(self.directory)
            index = _Index.load(self.directory)
            yield index
            index.save(self.directory)

    def fetch(
        self, url: str, field: str, *, sha256: Optional[str] = None, private_ok: bool = False
    ) -> Fetched:
        """The file at `url`: from the cache when it has it, else downloaded and added.

        `field` names the input in errors (InputError). `sha256`: the file this URL must hold (a
        reproduced request's); a cached file with another hash is fetched again, and a fresh one
        with another hash refused. `private_ok`: non-public hosts allowed whatever
        LCM_ALLOW_PRIVATE_URLS says (setup's own weights); its value is checked either way. A URL
        fetched from a non-public host is served from the cache only where such hosts are allowed.
        """
        start = time.monotonic()
        private_ok = allow_private_urls() or private_ok
        download = _Download(url, field, private_ok)
        download.parse(url)  # a URL that could never be fetched touches no disk
        with self._locked() as index:
            cached = index.urls.get(url)
            if cached is not None and sha256 in (None, cached) and (private_ok or url not in index.private):
                size = index.files[cached]
                index.used(cached, size)
                return Fetched(self.directory / cached, cached, size, False, time.monotonic() - start)
        fetched = self._download(download, start)
        if sha256 is not None and fetched.sha256 != sha256:
            raise InputError(
                field,
                url,
                f"the file whose sha256 is {sha256}; the file at this URL has changed: its sha256 is now "
                f"{fetched.sha256}",
            )
        return fetched

    def _download(self, download: _Download, start: float) -> Fetched:
        handle, name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=PARTIAL)
        partial = Path(name)
        try:
            with os.fdopen(handle, "wb") as out:
                sha, size = download.into(out)
                out.flush()
                os.fsync(out.fileno())  # on disk before its name says it is complete
            with self._locked() as index:
                os.replace(partial, self.directory / sha)
                index.used(sha, size)
                index.urls[download.url] = sha
                if download.reached_private:
                    index.private.add(download.url)
                else:
                    index.private.discard(download.url)
                index.evict(self.directory, self.budget_bytes, keep=sha)
        finally:
            partial.unlink(missing_ok=True)
        return Fetched(self.directory / sha, sha, size, True, time.monotonic() - start)


def cache() -> LoraCache:
    """The cache LCM_LORA_CACHE and LCM_LORA_CACHE_MB name (each checked), else the defaults."""
    budget = os.environ.get(CACHE_MB_ENV, "")
    if budget and not budget.isdecimal():
        raise LCMError(
            f"{CACHE_MB_ENV}={budget!r} is not allowed: use a whole number of MB for downloaded LoRAs to "
            f"take on disk (0: keep only the latest), default {DEFAULT_CACHE_MB}"
        )
    directory = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()
    return LoraCache(directory, int(budget or DEFAULT_CACHE_MB) * 1_000_000)


def download(url: str, field: str, *, sha256: Optional[str] = None, private_ok: bool = False) -> Fetched:
    """The file at `url` through the cache the environment names (see LoraCache.fetch)."""
    return cache().fetch(url, field, sha256=sha256, private_ok=private_ok)
