"""Optional parts: a missing one is one error naming the pip extra; the base install labels with a
server alone (torch, transformers, sentence-transformers and llama-cpp-python blocked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from freeal.config import LLMConfig
from freeal.errors import FreeALError
from freeal.extras import require
from openai_server import FakeOpenAIServer

HEAVY = ("torch", "transformers", "sentence_transformers", "llama_cpp")


def test_a_missing_part_names_its_extra(monkeypatch):
    from freeal.embed import Embedder
    from freeal.llm import make_annotator

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(FreeALError, match=r"pip install 'freeal\[local\]'"):
        make_annotator(LLMConfig(model="smollm2-135m"))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FreeALError, match=r"'torch', which is not installed: pip install 'freeal\[slm\]'"):
        Embedder(device="cpu", cache=False)
    with pytest.raises(FreeALError, match=r"'uvicorn'|'llama_cpp'"):
        require("llama_cpp", "uvicorn", what="`freeal serve`")


def test_the_base_install_labels_through_a_server(data_dir, tmp_path):
    out = tmp_path / "labels.jsonl"
    # a finder that refuses the heavy packages, as if they had never been installed
    block = (
        "import importlib.abc\n"
        "class NotInstalled(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {HEAVY!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
    )
    args = [
        "annotate", "--task", str(data_dir / "sst2"), "--data", str(data_dir / "sst2" / "test.jsonl"),
        "--limit", "6", "--out", str(out), "--backend", "openai", "--model", "m", "--calibrate", "off",
        "--cache", str(tmp_path / "c.sqlite"), "--quiet",
    ]  # fmt: skip
    with FakeOpenAIServer(labels=["negative", "positive"], keywords={"good": "positive"}) as server:
        code = f"import sys\n{block}sys.argv = ['freeal', *{args!r}, '--base-url', {server.url!r}]\n"
        code += "from freeal.cli import main\nmain()\nassert 'torch' not in sys.modules\n"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = Path(out).read_text()
    assert "NaN" not in text  # abstentions are null: strict JSON
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 6 and all(r["label"] in ("negative", "positive", None) for r in rows)
    assert any(r["label"] for r in rows)
