"""Client strings cannot forge log lines: messages are escaped; JSON lines are one object each."""
import json
import logging

import pytest

from pdcluster.logs import JsonFormatter, escape, install_escaping, setup_logging

FORGED = "abc\n2026-12-03 10:00:00 INFO pdcluster.router: request done id=admin\r\x1b[2J\u2028\u202e\x00"


def test_escape():
    out = escape(FORGED)
    assert out.isprintable() and "\n" not in out and "\x1b" not in out
    assert out == ("abc\\n2026-12-03 10:00:00 INFO pdcluster.router: request done id=admin\\r\\u2028"
                   "\\u202e\\x00")
    assert escape("\x1b[36mray::DecodeActor\x1b[39m died \x1b") == "ray::DecodeActor died \\x1b"
    assert escape("plain é ü 漢字 text") == "plain é ü 漢字 text"
    assert escape("a\\nb") == "a\\\\nb"           # a literal backslash-n cannot pass as an escape


def test_every_record_is_escaped_once_installed(caplog):
    old = logging.getLogRecordFactory()
    try:
        install_escaping()
        install_escaping()
        with caplog.at_level(logging.INFO, logger="pdcluster.test"):
            logging.getLogger("pdcluster.test").info("request %s: %s", FORGED, ValueError("x\ny"))
        [rec] = [r for r in caplog.records if r.name == "pdcluster.test"]
        line = logging.Formatter("%(levelname)s %(message)s").format(rec)
        assert "\n" not in line and "\x1b" not in line and line.startswith("INFO request abc\\n2026")
        assert line.endswith("x\\ny")
    finally:
        logging.setLogRecordFactory(old)


def test_json_lines_hold_the_exact_text_on_one_line():
    rec = logging.LogRecord("pdcluster.router", logging.WARNING, __file__, 1, "request %s failed", (FORGED,), None)
    try:
        raise RuntimeError("boom\nline")
    except RuntimeError:
        import sys
        rec.exc_info = sys.exc_info()
    out = JsonFormatter().format(rec)
    assert "\n" not in out and "\u2028" not in out and out.isascii()
    doc = json.loads(out)
    assert doc["msg"] == f"request {FORGED} failed" and doc["level"] == "WARNING"
    assert doc["logger"] == "pdcluster.router" and "RuntimeError: boom\nline" in doc["exc"]


def test_setup_logging_rejects_unknown_formats():
    with pytest.raises(ValueError, match="text, json"):
        setup_logging("INFO", "xml")


def test_a_request_id_cannot_add_fields_to_its_request_line(caplog):
    """router/lifecycle/log.py: logfmt values with a space, '=', a quote or a backslash are quoted."""
    import logging

    from pdcluster.router.lifecycle.log import Trace, log_request
    caplog.set_level(logging.INFO, logger="pdcluster.router.lifecycle")
    log_request('a status=stop prefill=x "y"', Trace(0.0, status="cancelled"), 5, None, 1.0)
    line = "request done " + caplog.records[-1].args[0]      # the fields as formatted (escaping aside)
    assert line.startswith('request done id="a status=stop prefill=x \\"y\\"" status=cancelled prefill=- ')
    assert line.count("status=") == 2 and "ttft_ms=- " in line    # the id's own "status=" sits inside its quotes
