"""`pdcluster serve` stopped by a signal while it starts: before, its handlers were installed only once the
workers had loaded, so a SIGINT then went unheard (serve came up anyway) and a SIGTERM hit Ray's own handler,
which aborted the process and left Ray's agents running without a parent."""
import signal
import subprocess
import time

import pytest

from tests.procs import BIN, stop_group, wait_for


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_workers_load_stops_what_had_started(tmp_path, sig):
    log = tmp_path / "serve.log"
    argv = [str(BIN / "pdcluster"), "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0",
            "--kv-cache-memory", "64"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
                                # (a shell's background job inherits SIGINT ignored; Python then never hears it)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: "starting 2 workers" in log.read_text(), 120, "the workers' start", proc, log)
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(60) == 130, log.read_text()[-2000:]
        text = log.read_text()
        assert "interrupted during start-up: stopped what had started" in text and "Traceback" not in text, text
        assert "pdcluster serving on" not in text and time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGKILL, 5)
