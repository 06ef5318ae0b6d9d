"""The benchmark peers' launchers (bench/llama_server.py, bench/vllm_peer.py): the command lines of
../PEERS.md, on the embedded model's own GGUF, and --help with defaults."""
import argparse

import pytest

from pdcluster.bench import llama_server, vllm_peer


def test_llama_server_serves_the_gguf_pdcluster_serves_with_the_peers_md_flags(tmp_path):
    gguf = llama_server.gguf_path()
    assert gguf.is_file() and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cmd = llama_server.serve_command(tmp_path / "llama-server", gguf, 8103, 2, 16, 16384, "smollm2")
    line = " ".join(cmd)
    for part in (f"-m {gguf}", "--port 8103", "-c 16384", "--parallel 16", "--cont-batching", "-t 2",
                 "--alias smollm2", "--host 127.0.0.1"):
        assert part in line, (part, line)
    assert "--no-repack" not in cmd
    no_repack = llama_server.serve_command(tmp_path / "llama-server", gguf, 8103, 2, 16, 16384, "smollm2",
                                           repack=False)
    assert no_repack == cmd + ["--no-repack"]


def test_llama_server_build_turns_the_server_on_and_the_downloaded_ui_off(tmp_path):
    cmd, env = llama_server.build_command(tmp_path)
    assert llama_server.LLAMA_CPP_PYTHON in cmd and f"build-dir={tmp_path}" in cmd
    assert "-DLLAMA_BUILD_SERVER=ON" in env["CMAKE_ARGS"] and "-DLLAMA_USE_PREBUILT_UI=OFF" in env["CMAKE_ARGS"]


def test_a_missing_llama_server_binary_is_one_clear_line(tmp_path, capsys):
    assert llama_server.main(["serve", "--build-dir", str(tmp_path)]) == 2
    assert "llama_server build" in capsys.readouterr().err


def test_vllm_serve_runs_the_api_server_module_and_refuses_an_empty_folder(tmp_path, capsys):
    cmd, env = vllm_peer.serve_command("/venv/bin/python", tmp_path, 8102, 4096, "smollm2")
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert vllm_peer.main(["serve", str(tmp_path), "--python", "/venv/bin/python"]) == 2
    assert "export" in capsys.readouterr().err


@pytest.mark.parametrize("mod", [llama_server, vllm_peer])
def test_every_option_has_help_and_its_default(mod, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    top = mod.build_parser()
    subs = [sp for a in top._actions if isinstance(a, argparse._SubParsersAction) for sp in a.choices.values()]
    assert subs
    for p in subs:
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), a.dest
            if a.option_strings and a.default not in (None, False):
                assert f"default: {a.default}" in text, (a.option_strings, a.default)
