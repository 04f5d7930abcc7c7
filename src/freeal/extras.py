"""Optional parts of freeal and the pip extra that brings each.

``pip install freeal`` labels with an OpenAI-compatible server alone; the embedded LLM needs
``freeal[local]`` (llama-cpp-python, compiled on install), the SLM and the loop's embeddings need
``freeal[slm]`` (torch, transformers, sentence-transformers, accelerate), ``freeal serve`` needs
``freeal[serve]``, Hugging Face ``datasets`` folders in and out need ``freeal[hub]``. Code that
uses a part calls :func:`require` first, so a missing part is one error naming the pip command
instead of an ImportError deep in a run.
"""

from __future__ import annotations

import importlib.util

from freeal.errors import FreeALError

#: The extra that installs each optional top-level module.
EXTRA_OF = {
    "llama_cpp": "local",
    "torch": "slm",
    "transformers": "slm",
    "sentence_transformers": "slm",
    "accelerate": "slm",
    "uvicorn": "serve",
    "fastapi": "serve",
    "datasets": "hub",
}


def require(*modules: str, what: str) -> None:
    """Check that ``modules`` are installed, or raise one :class:`FreeALError` saying which extra
    ``what`` needs. They are found, not imported: the code that uses a module imports it, and some
    callers never do (importing transformers takes about a second, which a ``head`` SLM on cached
    embeddings does not need)."""
    for module in modules:
        try:
            installed = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder that refuses it; a module left without a spec
            installed = False
        if not installed:
            extra = EXTRA_OF.get(module, "all")
            raise FreeALError(
                f"{what} needs the Python package {module!r}, which is not installed: "
                f"pip install 'freeal[{extra}]'"
            )
