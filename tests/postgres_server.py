"""A PostgreSQL server for the tests: a throwaway cluster from the distribution's binaries, or the
server ``AIGC_TEST_DATABASE_URL`` names.

The cluster lives in a fresh folder under the temporary directory, is made with ``initdb`` (trust
authentication, superuser ``postgres``) and started with ``pg_ctl`` on a free port of 127.0.0.1,
durability off (it is thrown away). ``initdb`` and the server refuse to run as root, so a root test
run starts them as the ``postgres`` system user, which the distribution's package creates.

Each test gets a fresh, empty database of its own (`PostgresServer.database`); on a server given by
URL, the URL's database is the one those are created from and dropped through.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg import sql

LIB_DIR = Path("/usr/lib/postgresql")
URL_SETTING = "AIGC_TEST_DATABASE_URL"
INSTALL_HINT = "install it with `apt-get install postgresql` (as root; `make test` does)"
START_TIMEOUT_S = 60
#: The system user that runs the cluster when the tests run as root (Debian's package makes it).
SYSTEM_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here and no server URL given."""


@dataclass
class PostgresServer:
    """A server the tests may create databases on: ``admin_url`` is the database they are
    created through. ``cluster`` is the folder of a throwaway cluster this run started (None for
    a server given by URL, which `stop` leaves running)."""

    admin_url: str
    cluster: Path | None = None
    bindir: Path | None = None
    user: str | None = None
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def url(self, database: str) -> str:
        """The URL of ``database`` on this server (the admin URL with another database)."""
        return urlsplit(self.admin_url)._replace(path="/" + quote(database)).geturl()

    def new_database(self, name: str) -> str:
        """Create ``name`` (fresh and empty: dropped first if a crashed run left it) and return its URL."""
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            # template0: a server given by URL may have put objects into template1.
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing whatever connections a test left open on it."""
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database for one test (its URL), dropped afterwards. The name carries the
        process id, so two test runs sharing one server do not meet."""
        name = f"aigc_test_{os.getpid()}_{next(self._names)}"
        url = self.new_database(name)
        try:
            yield url
        finally:
            self.drop_database(name)

    def postmaster_pid(self) -> int:
        """The process id of this run's cluster (its ``postmaster.pid``)."""
        if self.cluster is None:
            raise RuntimeError("a server given by URL is not this run's to inspect")
        return int((self.cluster / "data" / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop this run's cluster at once and remove its folder; a server given by URL stays up."""
        if self.cluster is None or self.bindir is None:
            return
        cluster, self.cluster = self.cluster, None
        atexit.unregister(self.stop)
        _run([str(self.bindir / "pg_ctl"), "-D", str(cluster / "data"), "-m", "immediate", "-w", "stop"],
             self.user, cluster, check=False)
        shutil.rmtree(cluster, ignore_errors=True)


def find_binaries(path: str | None = None, lib_dir: Path = LIB_DIR) -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: the one on ``path`` (default: PATH) first, else the
    highest version under ``lib_dir`` (Debian's /usr/lib/postgresql/<version>/bin, not on PATH)."""
    found = shutil.which("initdb", path=path if path is not None else os.environ.get("PATH", os.defpath))
    if found is not None:
        bindir = Path(found).resolve().parent  # /usr/local/bin/initdb may link into the real folder
        if (bindir / "pg_ctl").is_file():
            return bindir
    versions = [folder for folder in lib_dir.glob("*/bin")
                if os.access(folder / "initdb", os.X_OK) and os.access(folder / "pg_ctl", os.X_OK)]
    if versions:
        return max(versions, key=lambda folder: _version(folder.parent.name))
    raise PostgresUnavailable(f"no PostgreSQL server (initdb and pg_ctl) on PATH or under {lib_dir}/*/bin: "
                              f"{INSTALL_HINT}, or set {URL_SETTING} to a server's URL")


def _version(name: str) -> tuple[int, ...]:
    """'15' → (15,), '9.6' → (9, 6): numbers compare as numbers ('9.6' is older than '15')."""
    return tuple(int(part) for part in re.findall(r"\d+", name))


def start(bindir: Path) -> PostgresServer:
    """Make and start a throwaway cluster from the binaries in ``bindir``; it is stopped at exit
    at the latest."""
    user = SYSTEM_USER if os.geteuid() == 0 else None
    cluster = Path(tempfile.mkdtemp(prefix="aigc-pg-"))  # mode 0700: only its owner gets in
    try:
        if user is not None:
            shutil.chown(cluster, user, _group_of(user))
        data, sockets = cluster / "data", cluster / "socket"
        try:
            _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync"], user, cluster)
        except RuntimeError as failed:
            if user is None:
                raise
            raise RuntimeError(f"{failed}\n(the {user!r} user must be able to reach {cluster}: "
                               "point TMPDIR at a folder every user can enter, such as /tmp)") from None
        sockets.mkdir()
        if user is not None:
            shutil.chown(sockets, user, _group_of(user))
        for _attempt in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            with (data / "postgresql.conf").open("a") as conf:
                conf.write(f"\n# tests/postgres_server.py: a throwaway cluster, durability off\n"
                           f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                           f"unix_socket_directories = '{sockets}'\n"
                           "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
            started = _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(cluster / "server.log"), "-w",
                            "-t", str(START_TIMEOUT_S), "start"], user, cluster, check=False)
            if started.returncode == 0:
                break
            if "could not bind" not in _tail(cluster / "server.log"):
                raise RuntimeError(f"pg_ctl start failed ({started.returncode}): {started.stdout}\n"
                                   f"{_tail(cluster / 'server.log')}")
        else:
            raise RuntimeError(f"PostgreSQL found no free port:\n{_tail(cluster / 'server.log')}")
    except BaseException:
        shutil.rmtree(cluster, ignore_errors=True)
        raise
    server = PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", cluster, bindir, user)
    atexit.register(server.stop)  # a test run that dies still stops it
    _wait_ready(server)
    return server


def given(url: str) -> PostgresServer:
    """The server ``url`` names (a postgresql:// URL; its database is the admin database)."""
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ValueError(f"{URL_SETTING} must be a postgresql:// URL, not {_redacted(url)!r}")
    server = PostgresServer(url)
    _wait_ready(server, timeout=5.0)
    return server


def open_server(environ: Mapping[str, str] = os.environ, lib_dir: Path = LIB_DIR) -> PostgresServer:
    """``AIGC_TEST_DATABASE_URL``'s server when set, else a throwaway cluster (PostgresUnavailable
    when there are no binaries for one)."""
    url = environ.get(URL_SETTING, "").strip()
    if url:
        return given(url)
    return start(find_binaries(environ.get("PATH", os.defpath), lib_dir))


def open_or_skip(environ: Mapping[str, str] = os.environ, lib_dir: Path = LIB_DIR) -> PostgresServer:
    """`open_server`, with a missing PostgreSQL skipping the test, or failing it under CI=true
    (CI must run every test)."""
    try:
        return open_server(environ, lib_dir)
    except PostgresUnavailable as missing:
        if environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {missing}", pytrace=False)
        pytest.skip(str(missing))


def _wait_ready(server: PostgresServer, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(server.admin_url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as error:
            if time.monotonic() > deadline:
                log = _tail(server.cluster / "server.log") if server.cluster else ""
                raise RuntimeError(f"PostgreSQL at {_redacted(server.admin_url)} does not answer: {error}\n{log}") \
                    from error
            time.sleep(0.1)


def _run(command: list[str], user: str | None, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (as ``user`` when given: we are root), in ``cwd`` (the user can reach it)."""
    as_user = {} if user is None else {"user": user, "group": _group_of(user), "extra_groups": []}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30,
                          env={**os.environ, "LC_ALL": "C"}, **as_user)
    if check and done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


def _group_of(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        raise RuntimeError(f"the tests run as root, so PostgreSQL runs as the {user!r} system user, and there is "
                           f"none: {INSTALL_HINT} (it creates the user), or run the tests as another user") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _redacted(url: str) -> str:
    """``url`` without its password (a shared server's URL may carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
