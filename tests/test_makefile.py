"""`make setup`'s choice of torch build and index (`make torch-plan` prints it without installing).

nvidia-smi is the one thing the guess reads: a script named so stands in for the driver's, listing
a GPU or failing as the real one does on a machine without any.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

GPU = 'echo "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-0f6d7e4c-1b2a-4c3d-9e8f-0123456789ab)"'
NO_GPU = 'echo "No devices were found"; exit 6'


def _plan(tmp_path: Path, nvidia_smi: str, *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TORCH", None)
    env.pop("TORCH_INDEX", None)
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), "torch-plan", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def index_url(tmp_path: Path) -> Iterator[str]:
    """A package index on loopback with a torch page (it answers; nothing is installed from it)."""
    (tmp_path / "index" / "torch").mkdir(parents=True)
    (tmp_path / "index" / "torch" / "index.html").write_text("<html><body></body></html>")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_listed_gpu_picks_the_cuda_build_and_extra(tmp_path: Path) -> None:
    proc = _plan(tmp_path, GPU)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("torch: cuda build (TORCH=auto)")
    assert "extras [dev,diffusion,cuda]" in proc.stdout
    assert "--extra-index-url" not in proc.stdout  # PyPI's wheel is the CUDA build


def test_no_gpu_picks_the_cpu_build_from_the_cpu_index_when_it_answers(tmp_path: Path, index_url: str) -> None:
    proc = _plan(tmp_path, NO_GPU, f"TORCH_INDEX={index_url}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("torch: cpu build (TORCH=auto)")
    assert f"pip install --extra-index-url {index_url} torch" in proc.stdout
    assert "extras [dev,diffusion]" in proc.stdout and proc.stderr == ""


def test_an_index_that_does_not_answer_is_left_out(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = _plan(tmp_path, NO_GPU, "TORCH=cpu", f"TORCH_INDEX=http://127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    assert "--extra-index-url" not in proc.stdout and "pip install  torch" in proc.stdout
    assert proc.stderr.strip() == f"note: http://127.0.0.1:{port} does not answer: torch comes from pip's own indexes"


def test_the_torch_setting_overrides_the_guess(tmp_path: Path) -> None:
    # TORCH_INDEX empty: no probe of PyTorch's index from a test.
    assert _plan(tmp_path, GPU, "TORCH=cpu", "TORCH_INDEX=").stdout.startswith("torch: cpu build (TORCH=cpu)")
    assert _plan(tmp_path, NO_GPU, "TORCH=cuda").stdout.startswith("torch: cuda build (TORCH=cuda)")
    bad = _plan(tmp_path, GPU, "TORCH=gpu")
    assert bad.returncode != 0
    assert bad.stderr.strip().endswith("TORCH must be auto, cpu or cuda, not 'gpu'.  Stop.")
    assert len(bad.stderr.strip().splitlines()) == 1


# --- `make postgres` (a prerequisite of `make test`): installs PostgreSQL where it is absent ---------
# Scripts named apt-get and id stand in for the real ones (they log what apt-get was asked), and
# PG_LIB points at an empty folder, so this machine's own PostgreSQL is not seen.
APT_GET = """#!/bin/sh
echo "$*" >> "$APT_LOG"
case "$*" in install*) [ -n "$APT_FAIL_FIRST" ] && [ ! -e "$APT_LOG.updated" ] && exit 100 ;; esac
case "$*" in update*) touch "$APT_LOG.updated" ;; esac
exit 0
"""


def _make_postgres(tmp_path: Path, uid: int, *, initdb: bool = False, fail_first: bool = False,
                   url: str = "") -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {"apt-get": APT_GET, "id": f'#!/bin/sh\necho {uid}\n'}
    if initdb:
        scripts["initdb"] = "#!/bin/sh\nexit 0\n"
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "apt.log"
    env = {name: value for name, value in os.environ.items() if name not in ("AIGC_TEST_DATABASE_URL", "MAKEFLAGS")}
    # No /usr/local/bin (where this machine links initdb): only the system's own folders.
    env.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", APT_LOG=str(log),
               APT_FAIL_FIRST="1" if fail_first else "", AIGC_TEST_DATABASE_URL=url)
    proc = subprocess.run([str(shutil.which("make")), "-s", "--no-print-directory", "-C", str(REPO), "postgres",
                           f"PG_LIB={tmp_path / 'no-postgresql'}"], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_make_postgres_installs_postgresql_as_root_when_initdb_is_absent(tmp_path: Path) -> None:
    proc, apt = _make_postgres(tmp_path, uid=0)
    assert proc.returncode == 0, proc.stderr
    assert apt == ["install -y -qq postgresql"]
    assert "installing PostgreSQL" in proc.stdout


def test_make_postgres_updates_the_package_lists_when_the_first_install_fails(tmp_path: Path) -> None:
    proc, apt = _make_postgres(tmp_path, uid=0, fail_first=True)
    assert proc.returncode == 0, proc.stderr
    assert apt == ["install -y -qq postgresql", "update -qq", "install -y -qq postgresql"]
    assert "note:" not in proc.stdout


def test_make_postgres_leaves_a_note_when_not_root(tmp_path: Path) -> None:
    proc, apt = _make_postgres(tmp_path, uid=1000)
    assert proc.returncode == 0, proc.stderr
    assert apt == []
    assert proc.stdout.strip().startswith("note: PostgreSQL not installed (as root: apt-get install postgresql)")


@pytest.mark.parametrize("where", ["PATH", "PG_LIB", "AIGC_TEST_DATABASE_URL"])
def test_make_postgres_does_nothing_when_postgresql_or_a_server_url_is_there(tmp_path: Path, where: str) -> None:
    if where == "PG_LIB":  # Debian's layout: /usr/lib/postgresql/<version>/bin, not on PATH
        (tmp_path / "no-postgresql" / "15" / "bin").mkdir(parents=True)
        (tmp_path / "no-postgresql" / "15" / "bin" / "initdb").write_text("")
    proc, apt = _make_postgres(tmp_path, uid=0, initdb=where == "PATH",
                               url="postgresql://postgres@db.example:5432/postgres" if where.startswith("AIGC") else "")
    assert proc.returncode == 0, proc.stderr
    assert apt == [] and proc.stdout == ""
