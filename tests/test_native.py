"""llama.cpp on the user's CPU: the extra-buffer decision, crash reporting in a child process, doctor."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from freeal.cli import app
from freeal.errors import FreeALError
from freeal.llm import native

AMX_XEON = frozenset(["fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"])
ZEN3 = frozenset(["fpu", "sse2", "avx2", "fma"])
ZEN4 = frozenset(["fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16"])


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_tile\n\nprocessor\t: 1\n"
    assert native.cpu_flags(text) == {"fpu", "avx2", "amx_tile"}
    assert native.cpu_flags("no flags here") == frozenset()


def test_auto_turns_extra_buffers_off_on_amx_and_avx512_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    assert native.extra_buffers_decision("auto", AMX_XEON) == (
        False,
        "the CPU reports AMX, whose llama.cpp buffers crash",
    )
    assert native.use_extra_buffers("auto", ZEN4) is False
    assert native.use_extra_buffers("auto", ZEN3) is True
    # an explicit setting wins over the CPU, and the environment variable over auto
    assert native.use_extra_buffers("on", AMX_XEON) is True
    assert native.use_extra_buffers("off", ZEN3) is False
    monkeypatch.setenv(native.ENV_VAR, "off")
    assert native.use_extra_buffers("auto", ZEN3) is False
    monkeypatch.setenv(native.ENV_VAR, "sometimes")
    with pytest.raises(FreeALError, match="FREEAL_LLAMA_EXTRA_BUFFERS='sometimes'"):
        native.use_extra_buffers("auto", ZEN3)


def test_the_setting_reaches_llama_cpp_model_params() -> None:
    import llama_cpp.llama_cpp as lib

    assert lib.llama_model_default_params().use_extra_bufts is True  # llama.cpp's own default
    with native.extra_buffers_set(False):
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True  # restored


def _fake_child(crash_when_on: bool, crash_when_off: bool):  # type: ignore[no-untyped-def]
    """A child that dies of SIGSEGV as a broken llama.cpp build does (no model is loaded): llama.cpp's
    own line, then Python's crash dump cut mid-line by the signal."""
    crash = (
        "import os, signal, sys; print('load_tensors: AMX model buffer size = 9 MiB', file=sys.stderr); "
        "sys.stderr.write('Fatal Python error: Segmentation fault\\n  File \"native.py\", line '); "
        "sys.stderr.flush(); os.kill(os.getpid(), signal.SIGSEGV)"
    )
    fine = 'print(\'{"load_seconds": 0.1, "decoded_tokens": 12}\')'

    def command(model, extra_buffers, speed, threads):  # type: ignore[no-untyped-def]
        dies = crash_when_on if extra_buffers else crash_when_off
        return [sys.executable, "-c", crash if dies else fine]

    return command


@pytest.fixture
def cache_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    return tmp_path


def test_a_crash_with_the_buffers_on_falls_back_to_off_under_auto(cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: ZEN3)  # auto would keep them on
    monkeypatch.setattr(native, "child_command", _fake_child(crash_when_on=True, crash_when_off=False))
    assert native.checked_extra_buffers("model.gguf", "auto", identity="m") is False
    # the verdict is cached: a child that would now crash either way is not run again
    monkeypatch.setattr(native, "child_command", _fake_child(crash_when_on=True, crash_when_off=True))
    assert native.checked_extra_buffers("model.gguf", "auto", identity="m") is False
    assert len(list((cache_dir / "native-checks").glob("*.json"))) == 1


def test_a_native_crash_is_one_clear_error(cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: AMX_XEON)
    monkeypatch.setattr(native, "cpu_name", lambda: "Intel Xeon Platinum 8480+")
    monkeypatch.setattr(native, "child_command", _fake_child(crash_when_on=True, crash_when_off=True))
    with pytest.raises(FreeALError) as err:
        native.checked_extra_buffers("/models/x.gguf", "on", identity="x")
    message = str(err.value)
    assert "crashed loading x.gguf" in message
    assert "killed by SIGSEGV" in message
    assert "Intel Xeon Platinum 8480+" in message and "amx_tile" in message
    assert "extra buffers on" in message and "freeal doctor" in message
    assert "last line: load_tensors: AMX model buffer size" in message  # llama.cpp's words, not the dump's
    assert not list((cache_dir / "native-checks").glob("*.json"))  # a failure is not cached


@pytest.mark.slow
def test_the_annotator_loads_without_extra_buffers_on_an_amx_cpu(cache_dir, monkeypatch) -> None:
    """The AMX decision forced from a fake flag list, on a real model: it loads and scores the same."""
    from freeal.llm.llamacpp import LlamaCppAnnotator
    from freeal.llm.models import resolve_model

    path, name = resolve_model("smollm2-135m")
    prompt = [{"role": "user", "content": "Is 'a lovely film' positive or negative?"}]
    # the reference loads with the buffers on, except on a real AMX Xeon, where that crashes
    # (SIGILL, seen on one): there the forced path is compared with a plain load without them
    reference = "off" if native.AMX_FLAGS & native.cpu_flags() else "on"
    plain = LlamaCppAnnotator(path, name=name, n_ctx=512, extra_buffers=reference)
    assert plain.extra_buffers is (reference == "on")
    expected = plain.score(prompt, ["positive", "negative"])
    del plain
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: AMX_XEON)
    amx = LlamaCppAnnotator(path, name=name, n_ctx=512)
    assert amx.extra_buffers is False
    found = amx.score(prompt, ["positive", "negative"])
    assert found.label == expected.label
    assert found.scores == pytest.approx(expected.scores, abs=1e-3)


@pytest.mark.slow
def test_doctor_reports_each_setting(cache_dir, tmp_path) -> None:
    out = tmp_path / "doctor.json"
    result = CliRunner().invoke(app, ["doctor", "--model", "smollm2-135m", "--no-speed", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "extra weight buffers" in result.output and "ok" in result.output
    found = json.loads(out.read_text())
    settings = found["models"]["smollm2-135m"]
    assert set(settings) == {"on", "off"}
    assert "crashed" not in settings["off"]
    if native.AMX_FLAGS & native.cpu_flags():
        assert "extra weight buffers: off under auto" in result.output
    else:  # only AMX buffers are known to crash
        assert "crashed" not in settings["on"]
    assert found["llama_cpp_python"]
