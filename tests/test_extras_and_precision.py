"""Optional extras fail with a one-line hint; ``auto`` precision follows the CPU's native support."""

import importlib

import pytest

from deepssim import DeepSSIMError, hardware
from deepssim.extras import require


def test_a_missing_extra_names_its_pip_command(monkeypatch):
    real_import = importlib.import_module

    def missing(name, *args):
        if name.startswith("monai"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(DeepSSIMError, match=r"pip install 'deepssim\[ldm\]'"):
        require("monai")
    assert require("json").dumps([1]) == "[1]"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2"}, "float32"), ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16")],
)
def test_auto_precision_is_bfloat16_only_where_native(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(DeepSSIMError, match="float16 needs a CUDA device"):
        hardware.resolve_precision("float16", "cpu")
    with pytest.raises(DeepSSIMError, match="precision must be one of"):
        hardware.resolve_precision("half", "cpu")


def test_cpu_description_names_the_instruction_sets():
    text = hardware.cpu_description()
    assert "torch capability" in text and "threads" in text
