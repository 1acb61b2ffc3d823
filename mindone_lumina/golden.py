"""The golden bundle: reference inputs and outputs of the PyTorch implementations, read without torch.

``tools/make_golden.py`` writes it from the references on CPU in fp32; ``tools/selfcheck.py`` runs every component of
the port against it on the device at hand (an Ascend NPU, or CPU in CI). A copy ships in the package
(``mindone_lumina/assets/golden``, about 4 MB). Layout of a bundle folder::

    golden.json                 the manifest: format, generator, library versions, what each case is
    cases.safetensors           every input and reference output, keys "<component>/<case>/<name>"
    model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/
                                a tiny but shape-faithful diffusers LuminaPipeline (Next-DiT with GQA and head_dim 72
                                as the 2B model, qk-norm; Gemma with one kv head; an 8x VAE)
    flagdit/                    a tiny Flag-DiT in the original Lumina-T2I layout (consolidated safetensors)

Every file is written deterministically (sorted keys, no timestamps), so a regenerated bundle is bit-identical.
"""

import os

import numpy as np

from .atomic import read_json, write_json
from .weights.safetensors import SafetensorsFile, write_safetensors
from .weights.tensors import TensorSpec

FORMAT = 1
MANIFEST, CASES = "golden.json", "cases.safetensors"
FLAGDIT = "flagdit"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "golden")


def write_cases(folder: str, arrays: dict) -> None:
    """``arrays`` (key -> numpy array) into ``folder/cases.safetensors`` in sorted key order."""
    specs = [_spec(k, np.ascontiguousarray(arrays[k])) for k in sorted(arrays)]
    write_safetensors(os.path.join(folder, CASES), specs)


def _spec(key: str, value: np.ndarray) -> TensorSpec:
    return TensorSpec(key, value.shape, value.dtype.name, lambda: value)


def write_manifest(folder: str, manifest: dict) -> None:
    write_json(os.path.join(folder, MANIFEST), {"format": FORMAT, **manifest})


class Bundle:
    """A golden bundle folder opened for reading: ``manifest``, ``array(key)``, ``case(prefix)``, ``path(part)``."""

    def __init__(self, folder: str):
        manifest_path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise ValueError(f"{folder} is not a golden bundle (no {MANIFEST}); make one with tools/make_golden.py")
        self.folder = folder
        self.manifest = read_json(manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: bundle format {self.manifest.get('format')!r}, this reader: {FORMAT}")
        self._cases = SafetensorsFile(os.path.join(folder, CASES))

    def path(self, part: str = "") -> str:
        return os.path.join(self.folder, part) if part else self.folder

    def keys(self) -> list:
        return self._cases.keys()

    def array(self, key: str) -> np.ndarray:
        if key not in self._cases.keys():
            raise ValueError(f"golden bundle {self.folder} has no tensor {key!r}")
        return self._cases.read(key)

    def case(self, prefix: str) -> dict:
        """Every tensor under ``prefix/`` as name -> array (the prefix stripped)."""
        start = prefix.rstrip("/") + "/"
        found = {k[len(start) :]: self._cases.read(k) for k in self._cases.keys() if k.startswith(start)}
        if not found:
            raise ValueError(f"golden bundle {self.folder} has no case {prefix!r}")
        return found
