"""`stitchbench ui`: serves this workspace's store on localhost, links the model-training view."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

from .conftest import EXE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_binds_localhost_and_links_the_model_training_view(workspace):
    port = _free_port()
    env = dict(os.environ, STITCHBENCH_WORKSPACE=str(workspace))
    proc = subprocess.Popen([str(EXE), "ui", "--port", str(port)], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 90
        status = None
        while time.time() < deadline and status is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
        assert (workspace / "mlruns" / "mlflow.db").exists()
        # nothing listens on the other interfaces
        addrs = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), port, socket.AF_INET)} - {"127.0.0.1"}
        for addr in addrs:
            with socket.socket() as s:
                s.settimeout(1)
                assert s.connect_ex((addr, port)) != 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in err
    assert "no authentication" not in err
