"""The test run's own guards (the root conftest.py), checked in a pytest of
their own: a socket an earlier test left unclosed is reported as a warning
naming that test, also when it is freed by the garbage collector (a socket
in a reference cycle, as drivers' connections are) or when its origin was
lost; a socket a test leaks and frees itself still fails that test, unless
its owner closed it while a reader of it was still open (an interrupted
driver close leaves that), which is a warning too."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

PROBE = """
import gc, socket

_keep = []


class Cycle:
    def __init__(self):
        self.me = self
        self.sock = socket.socket()


def test_a_leaks():
    _keep.append(Cycle())


def test_b_frees_it():
    _keep.clear()
    gc.collect()


def test_c_leaks_and_frees_its_own():
    Cycle()
    gc.collect()


_kept = []


def test_d_leaks_another():
    _kept.append(socket.socket())


def test_e_frees_one_whose_origin_was_lost():
    import conftest

    conftest._socket_origins.clear()  # as a pruned entry leaves it
    _kept.clear()


# A driver connection whose close was interrupted between its reader's
# close and the socket's: the socket is closed, its reader is not, and its
# descriptor stays open until the reader is freed.
class HalfClosed:

    def __init__(self):
        self.me = self
        self.sock = socket.socket()
        self.reader = self.sock.makefile("rb")
        self.sock.close()


def test_f_frees_a_half_closed_one_of_its_own():
    HalfClosed()
    gc.collect()
"""


def test_a_socket_leaked_by_an_earlier_test_is_a_warning_naming_it(
    tmp_path: pathlib.Path,
) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "conftest",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "-q",
            str(probe),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert "1 failed, 5 passed" in out, out
    assert "FAILED" in out and "test_c_leaks_and_frees_its_own" in out, out
    assert "test_b_frees_it" not in out.split("short test summary")[-1], out
    assert "A socket made by an earlier test (test_probe.py::test_a_leaks" in out, out
    assert "A socket made by an earlier test (a test not recorded" in out, out
    half = "A socket closed while a reader of it was open (made by test_probe.py::test_f_"
    assert half in out, out
