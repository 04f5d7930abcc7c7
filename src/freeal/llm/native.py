"""llama.cpp on the user's CPU: which weight buffers to use, and a crash turned into one clear line.

llama.cpp's CPU backend can repack weights into "extra buffer types" for the instructions a CPU has
(AVX2/AVX-512 repacked blocks, Intel AMX tiles). On Sapphire-Rapids-class Xeons the AMX buffers
segfault at the first decode (upstream ggml-org/llama.cpp#20824), which takes the whole Python
process down with no message. Two defences live here:

- :func:`extra_buffers_decision` decides per CPU: off where the CPU reports AMX (crash) or AVX-512
  (measured faster off), llama.cpp's default elsewhere; overridable with ``llm.extra_buffers`` or
  the environment variable ``FREEAL_LLAMA_EXTRA_BUFFERS`` (``on``/``off``).
- :func:`checked_extra_buffers` loads the model once in a *child process* and decodes a few tokens
  before the real process does. A native crash there becomes a :class:`FreeALError` naming the
  signal, the CPU and the setting (and, under ``auto``, a retry with the extra buffers off). The
  verdict is cached per llama.cpp build, model, CPU and setting, so it is paid once.

``python -m freeal.llm.native MODEL --extra-buffers on|off [--speed]`` is that child; ``freeal
doctor`` runs it for every installed model and prints prefill speeds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from freeal.config import cache_root
from freeal.data import write_text_atomic
from freeal.errors import FreeALError

log = logging.getLogger(__name__)

ExtraBuffers = Literal["auto", "on", "off"]

#: CPU flags (as /proc/cpuinfo names them) whose llama.cpp buffers are known to crash.
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
#: Flags worth showing a user when a native library misbehaves.
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ENV_VAR = "FREEAL_LLAMA_EXTRA_BUFFERS"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags the CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_name() -> str:
    """The CPU's model name, for messages and cache keys."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def extra_buffers_decision(
    setting: ExtraBuffers = "auto", flags: frozenset[str] | None = None
) -> tuple[bool, str]:
    """Whether llama.cpp may repack weights into extra buffer types on this CPU, and why.

    ``on``/``off`` are taken as given; ``auto`` reads ``$FREEAL_LLAMA_EXTRA_BUFFERS``, then turns
    them off where the CPU reports AMX (the crashing buffer type) or AVX-512 (measured faster
    without them: 1.5B prefill 150 against 98 tokens/s in 512-token batches on an AVX-512 EPYC,
    ``bench/native.py``, BENCHMARKS.md), and leaves llama.cpp's default (on) elsewhere."""
    if setting != "auto":
        return setting == "on", "set in the config"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("on", "off"):
        return env == "on", f"set by {ENV_VAR}"
    if env not in ("", "auto"):
        raise FreeALError(f"{ENV_VAR}={env!r}: expected on, off or auto")
    flags = cpu_flags() if flags is None else flags
    if AMX_FLAGS & flags:
        return False, "the CPU reports AMX, whose llama.cpp buffers crash"
    if "avx512f" in flags:
        return False, "the CPU has AVX-512, where prefill measured faster without them"
    return True, "llama.cpp's default"


def use_extra_buffers(setting: ExtraBuffers = "auto", flags: frozenset[str] | None = None) -> bool:
    """:func:`extra_buffers_decision` without the reason."""
    return extra_buffers_decision(setting, flags)[0]


@contextlib.contextmanager
def extra_buffers_set(enabled: bool) -> Iterator[None]:
    """Every ``llama_cpp.Llama`` made inside loads with the extra weight buffers on or off (it has no
    argument for ``use_extra_bufts``, so the defaults it starts from are wrapped meanwhile)."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def defaults() -> Any:
        params = original()
        if hasattr(params, "use_extra_bufts"):  # builds before the field existed have no such buffers
            params.use_extra_bufts = enabled
        return params

    lib.llama_model_default_params = defaults  # type: ignore[assignment]
    try:
        yield
    finally:
        lib.llama_model_default_params = original  # type: ignore[assignment]


def load_llama(path: str | Path, *, extra_buffers: bool, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)`` with the extra weight buffers on or off."""
    import llama_cpp

    with extra_buffers_set(extra_buffers):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


def build_info() -> dict[str, str]:
    """llama-cpp-python's version and the system info line of the llama.cpp it was built with."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {
        "llama_cpp_python": str(llama_cpp.__version__),
        "system_info": (info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)).strip(),
    }


def _build_id() -> str:
    """Identifies the compiled library: a rebuild (or another wheel) is checked again."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    parts = [str(llama_cpp.__version__)]
    for lib in (
        sorted(lib_dir.glob("*.so*")) + sorted(lib_dir.glob("*.dylib")) + sorted(lib_dir.glob("*.dll"))
    ):
        stat = lib.stat()
        parts.append(f"{lib.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return ";".join(parts)


# -- the child process ------------------------------------------------------------------------------
def measure(
    path: str | Path, *, extra_buffers: bool, speed: bool, threads: int | None = None, repeats: int = 2
) -> dict:
    """Load the model, decode a short prompt (where a broken build crashes) and, with ``speed``,
    time prefill in 512-token and 32-token batches. Runs in the child process."""
    from freeal.llm.llamacpp import default_threads

    threads = threads or default_threads()
    start = time.perf_counter()
    llm = load_llama(
        path, extra_buffers=extra_buffers, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads
    )
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - start, "threads": threads}
    tokens = llm.tokenize(b"Label the sentiment of this review: a warm, funny and moving film.", add_bos=True)
    llm.eval(tokens)
    result["decoded_tokens"] = len(tokens)
    if speed:
        filler = llm.tokenize(("the quick brown fox jumps over the lazy dog " * 120).encode(), add_bos=False)
        text = filler[:512]
        for batch in (512, 32):
            llm.n_batch = batch
            best = 0.0
            for _ in range(repeats):  # the best of a few: the first pass can still fault pages in
                llm.reset()
                start = time.perf_counter()
                llm.eval(text)
                best = max(best, len(text) / (time.perf_counter() - start))
            result[f"prefill_{batch}_tps"] = best
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load a GGUF model with llama.cpp and decode a few tokens.")
    parser.add_argument("model")
    parser.add_argument("--extra-buffers", choices=("on", "off"), required=True)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import faulthandler

    faulthandler.enable()  # a native crash prints the Python stack to stderr before the signal kills us
    result = measure(
        args.model, extra_buffers=args.extra_buffers == "on", speed=args.speed, threads=args.threads
    )
    print(json.dumps(result), flush=True)


def child_command(model: str | Path, extra_buffers: bool, speed: bool, threads: int | None) -> list[str]:
    """The child's command line (tests replace it to simulate a crashing build)."""
    command = [
        sys.executable,
        "-m",
        "freeal.llm.native",
        str(model),
        "--extra-buffers",
        "on" if extra_buffers else "off",
    ]
    if speed:
        command.append("--speed")
    if threads:
        command += ["--threads", str(threads)]
    return command


def run_child(
    model: str | Path,
    *,
    extra_buffers: bool,
    speed: bool = False,
    threads: int | None = None,
    timeout: float = 600,
) -> dict:
    """Run :func:`measure` in a child process. Returns its numbers, or ``{"crashed": why, ...}``."""
    command = child_command(model, extra_buffers, speed, threads)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"crashed": f"no answer within {timeout:.0f} s", "stderr": ""}
    if done.returncode == 0:
        for line in reversed(done.stdout.splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    code = done.returncode
    why = (
        f"killed by {signal.Signals(-code).name}"
        if code < 0 and -code in signal.valid_signals()
        else f"exit status {code}"
    )
    return {"crashed": why, "stderr": done.stderr[-2000:]}


def describe_cpu() -> str:
    flags = cpu_flags()
    shown = " ".join(f for f in SHOWN_FLAGS if f in flags) or "none of " + "/".join(SHOWN_FLAGS[:3])
    return f"{cpu_name()} (flags: {shown})"


def checked_extra_buffers(model: str | Path, setting: ExtraBuffers = "auto", *, identity: str = "") -> bool:
    """The extra-buffer setting under which this model loads and decodes on this CPU, checked once
    in a child process (cached per build, model, CPU and setting).

    Raises :class:`FreeALError` when llama.cpp crashes there; under ``auto`` a crash with the
    buffers on is retried with them off, which is then used (and said in the log)."""
    wanted = use_extra_buffers(setting)
    key_src = json.dumps([_build_id(), identity or str(model), sorted(cpu_flags()), cpu_name(), wanted])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    marker = cache_root() / "native-checks" / f"{key}.json"
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return bool(json.loads(marker.read_text())["extra_buffers"])
    tried = [wanted, False] if (wanted and setting == "auto" and not os.environ.get(ENV_VAR)) else [wanted]
    failures = []
    for enabled in tried:
        found = run_child(model, extra_buffers=enabled)
        if "crashed" not in found:
            if enabled != wanted:
                log.warning(
                    "llama.cpp crashed with its extra weight buffers on this CPU (%s); using them off "
                    "(set llm.extra_buffers or %s to choose)",
                    describe_cpu(),
                    ENV_VAR,
                )
            write_text_atomic(marker, json.dumps({"extra_buffers": enabled, "model": str(model), **found}))
            return enabled
        failures.append(f"extra buffers {'on' if enabled else 'off'}: {found['crashed']}")
    # What the child printed before Python's crash dump (llama.cpp's own assert, say); the dump itself
    # names only freeal's frames, and a signal can cut it mid-line (SIGILL on an AMX Xeon did).
    printed = found.get("stderr", "").split("Fatal Python error:")[0]
    last_lines = [ln.strip() for ln in printed.splitlines() if ln.strip()][-1:]
    raise FreeALError(
        f"llama.cpp (llama-cpp-python {build_info()['llama_cpp_python']}) crashed loading {Path(model).name} "
        f"on this CPU, {describe_cpu()} ({'; '.join(failures)}"
        f"{'; last line: ' + last_lines[0] if last_lines else ''}); run `freeal doctor` for details, try "
        f"llm.extra_buffers: {'on' if not tried[-1] else 'off'} (or {ENV_VAR}), or rebuild llama-cpp-python "
        "for this CPU (README, set-up)"
    )


if __name__ == "__main__":
    main()
