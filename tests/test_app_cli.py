"""`lance app`: argument checks and the Streamlit command it serves (the server itself runs in
tests/test_browser_app.py)."""
from __future__ import annotations

from engine.cli import build_parser, main
from lance_app.cli import entrypoint, streamlit_argv


def test_binds_localhost_without_telemetry_by_default():
    args = build_parser().parse_args(["app"])
    assert (args.address, args.port) == ("localhost", 8501)
    argv = streamlit_argv(args.port, args.address)
    assert argv[argv.index("--server.address") + 1] == "localhost"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert argv[argv.index("--server.headless") + 1] == "true"
    assert entrypoint().name == "main.py" and entrypoint().is_file()


def test_bad_port_is_refused_with_the_reason(capsys):
    assert main(["app", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
