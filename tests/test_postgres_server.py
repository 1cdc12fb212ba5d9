"""The tests' PostgreSQL (tests/postgres_server.py): a throwaway cluster of this run, a fresh
database per test, and what happens where PostgreSQL is missing."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests import postgres_server as pg

REPO = Path(__file__).resolve().parent.parent


def _own_cluster(server: pg.PostgresServer) -> Path:
    if server.cluster is None:
        pytest.skip(f"{pg.URL_SETTING} names the server: no cluster of this run to inspect")
    return server.cluster


def test_a_test_database_stores_and_returns_rows(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://")
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes (body) VALUES (%s), (%s)", ("héllo", "world"))
        conn.commit()
    with psycopg.connect(postgres_url) as conn:  # a second connection sees the committed rows
        assert conn.execute("SELECT body FROM notes ORDER BY id").fetchall() == [("héllo",), ("world",)]
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)


@pytest.mark.parametrize("turn", [1, 2])
def test_each_test_starts_on_an_empty_database(postgres_url: str, turn: int) -> None:
    # Both turns leave a table behind: the later one fails if it were handed the same database.
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        assert conn.execute("SELECT current_database()").fetchone() == (urlsplit(postgres_url).path[1:],)
        conn.execute("CREATE TABLE left_behind (turn int)")


def test_databases_are_apart_and_dropped_afterwards_even_with_a_connection_open(
        postgres_server: pg.PostgresServer) -> None:
    with postgres_server.database() as first, postgres_server.database() as second:
        assert first != second
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
        stays_open = psycopg.connect(second)  # a test that forgets to close: the drop closes it
        assert stays_open.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    names = [urlsplit(url).path[1:] for url in (first, second)]
    with psycopg.connect(postgres_server.admin_url) as admin:
        left = admin.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,)).fetchall()
    assert left == []
    with pytest.raises(psycopg.OperationalError):
        stays_open.execute("SELECT 1")
    stays_open.close()


def test_the_cluster_is_throwaway_and_runs_as_the_postgres_user_under_root(
        postgres_server: pg.PostgresServer) -> None:
    cluster = _own_cluster(postgres_server)
    expected = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    with psycopg.connect(postgres_server.admin_url) as admin:
        settings = dict(admin.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('data_directory', 'listen_addresses', 'port',"
            " 'fsync', 'synchronous_commit', 'full_page_writes', 'max_connections')").fetchall())
        assert admin.execute("SELECT current_user").fetchone() == ("postgres",)  # the database superuser
    assert Path(settings["data_directory"]) == cluster / "data"
    assert pwd.getpwuid(os.stat(settings["data_directory"]).st_uid).pw_name == expected
    assert pwd.getpwuid(os.stat(f"/proc/{postgres_server.postmaster_pid()}").st_uid).pw_name == expected
    assert settings["listen_addresses"] == "127.0.0.1"
    assert int(settings["port"]) == urlsplit(postgres_server.admin_url).port
    assert (settings["fsync"], settings["synchronous_commit"], settings["full_page_writes"]) == ("off",) * 3
    assert settings["max_connections"] == "200"


def test_a_test_run_that_dies_leaves_no_server_behind(postgres_server: pg.PostgresServer) -> None:
    _own_cluster(postgres_server)
    script = ("import sys; from pathlib import Path; from tests import postgres_server as pg\n"
              "server = pg.start(Path(sys.argv[1]))\n"
              "print(server.postmaster_pid(), server.cluster, flush=True)\n"
              "raise RuntimeError('the test run dies')\n")
    died = subprocess.run([sys.executable, "-c", script, str(postgres_server.bindir)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert died.returncode == 1 and "the test run dies" in died.stderr
    pid, cluster = died.stdout.split()
    assert not Path(cluster).exists()
    assert not _running(int(pid))


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: where PID 1 does not reap, an ended server stays one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_server_given_by_url_is_used_and_left_running(postgres_server: pg.PostgresServer, tmp_path: Path) -> None:
    given = pg.open_server({pg.URL_SETTING: postgres_server.admin_url, "PATH": ""}, lib_dir=tmp_path)
    assert given.cluster is None and given.admin_url == postgres_server.admin_url
    with given.database() as url:
        assert urlsplit(url).netloc == urlsplit(postgres_server.admin_url).netloc
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    given.stop()
    with psycopg.connect(postgres_server.admin_url) as admin:  # still up
        assert admin.execute("SELECT 1").fetchone() == (1,)


def test_a_server_url_of_another_kind_is_refused_without_its_password() -> None:
    with pytest.raises(ValueError, match=r"AIGC_TEST_DATABASE_URL must be a postgresql:// URL") as refused:
        pg.open_server({pg.URL_SETTING: "mysql://bot:s3cret@db.example/aigc"})
    assert "s3cret" not in str(refused.value) and "bot:***@db.example" in str(refused.value)


def _fake_binaries(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


def test_the_binaries_come_from_path_first_then_the_highest_version_in_the_lib_dir(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    for version in ("9.6", "13", "15"):
        _fake_binaries(lib / version / "bin", "initdb", "pg_ctl")
    _fake_binaries(lib / "16" / "bin", "initdb")  # half an installation: no pg_ctl
    assert pg.find_binaries("", lib) == lib / "15" / "bin"  # not "9.6", the highest by text
    on_path = _fake_binaries(tmp_path / "bin", "initdb", "pg_ctl")
    assert pg.find_binaries(str(on_path), lib) == on_path


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_postgresql_skips_the_test_or_fails_it_under_ci(tmp_path: Path, ci: str) -> None:
    environ = {"PATH": str(tmp_path), "CI": ci}  # nothing on PATH, nothing in the lib dir
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as stopped:
        pg.open_or_skip(environ, lib_dir=tmp_path / "no-postgresql")
    message = str(stopped.value)
    assert message.startswith("CI=true and no PostgreSQL server" if ci else "no PostgreSQL server")
    assert f"under {tmp_path / 'no-postgresql'}/*/bin" in message
    assert "apt-get install postgresql" in message and "AIGC_TEST_DATABASE_URL" in message
