"""Packaging: the engine knows no UI, and a non-editable wheel install serves the app.

The wheel test builds the project's wheel, installs it (no dependencies: torch, streamlit … come
from the system through ``--system-site-packages``) into a fresh virtual environment, checks that
``engine`` and ``lance_app`` (pages included) resolve to that environment and not to this checkout,
then starts the installed ``lance app`` and fetches every page over HTTP.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from engine.cli import ENTRY_POINT_GROUP, build_parser

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra) -> dict:
    """This environment without anything pointing Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


def _imported_after(code: str) -> list[str]:
    """Top-level packages among streamlit / lance_app / pages that ``code`` leaves in sys.modules."""
    probe = (code + "; import sys, json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules}"
             " & {'streamlit', 'lance_app', 'pages'})))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_engine_imports_neither_streamlit_nor_the_app():
    assert _imported_after("import engine, engine.cli") == []
    # every engine module, the CLI's subcommand modules included
    walk = ("import importlib, pkgutil, engine; [importlib.import_module(m.name) for m in "
            "pkgutil.walk_packages(engine.__path__, 'engine.') if not m.name.endswith('__main__')]")
    assert _imported_after(walk) == []


def test_lance_help_does_not_import_streamlit():
    # building the parser loads the app's registration (lance_app.cli), which must not pull in Streamlit
    assert "streamlit" not in _imported_after("import engine.cli; engine.cli.build_parser()")


def test_lance_app_is_registered_by_the_app_package():
    apps = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == "app"]
    assert [e.value for e in apps] == ["lance_app.cli:register"], "reinstall: pip install -e ."
    assert build_parser().parse_args(["app", "--port", "9"]).func.__module__ == "lance_app.cli"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


@pytest.mark.slow
def test_wheel_install_in_a_fresh_venv_serves_every_page(tmp_path):
    # build from a copy of the tracked files, so the build leaves nothing (build/, *.egg-info) in the checkout
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300,
                           env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("lance_lab-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = _clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1", LANCE_HOME=str(tmp_path / "home"))
    # the system pip installs into the venv when run by the venv's interpreter
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    probe = (
        "import importlib.util, json, engine, lance_app, lance_app.pages\n"
        "from lance_app.paths import PAGES, pages_dir\n"
        "print(json.dumps({'engine': engine.__file__, 'lance_app': lance_app.__file__,\n"
        "  'pages_dir': str(pages_dir()), 'pages': [importlib.util.find_spec('lance_app.pages.' + p[:-3]).origin\n"
        "  for p, *_ in PAGES], 'urls': [u for *_, u in PAGES]}))\n"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    site = (env_dir / "lib").resolve()
    for key in ("engine", "lance_app", "pages_dir"):
        assert Path(found[key]).resolve().is_relative_to(site), (key, found[key])
    assert len(found["pages"]) >= 6
    for origin in found["pages"]:
        assert Path(origin).resolve().is_relative_to(site) and Path(origin).is_file(), origin

    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([str(env_dir / "bin" / "lance"), "app", "--port", str(port), "--address", "127.0.0.1"],
                              env=dict(env, PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT,
                              cwd=tmp_path, start_new_session=True)
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _get(base + "/_stcore/health") == (200, b"ok"):
                    break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no health answer in 90 s:\n" + (
                tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        for url in found["urls"]:
            status, body = _get(f"{base}/{url}")
            assert status == 200 and b"<title>Streamlit</title>" in body, url
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
    log_text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log_text, log_text[-3000:]
