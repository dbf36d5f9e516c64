"""Export a Hugging Face encoder directory to ONNX, once, for the ONNX Runtime backend.

Runs in a child process (``python -m microserve.engines.encoder.onnx_export SRC DST KIND``) so that torch, which
only the export needs, never stays resident in the server. The dynamo exporter keeps batch and sequence length
symbolic; the legacy TorchScript exporter bakes transformers' mask-building shape logic into the graph, which
is then wrong for every shape but the example's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from microserve.engines.base import EncoderKind
from microserve.progress import Progress

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the exported graph's inputs or outputs change
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "config.json")


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


def export_key(path: Path, kind: EncoderKind) -> str:
    """A cache key that changes whenever the weights or config of ``path`` change (size and mtime)."""
    digest = hashlib.sha256(f"{EXPORT_FORMAT}:{kind}:{path.resolve()}".encode())
    for name in _WEIGHTS:
        file = path / name
        if file.is_file():
            stat = file.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def exported_model(path: Path, kind: EncoderKind, cache_dir: Path) -> Path:
    """The ONNX file for ``path``, exported into ``cache_dir`` on first use (atomically, in a child process)."""
    target = cache_dir / "onnx" / f"{path.resolve().name}-{kind}-{export_key(path, kind)}" / "model.onnx"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".model.{os.getpid()}.onnx")
    cmd = [sys.executable, "-m", "microserve.engines.encoder.onnx_export", str(path), str(tmp), kind]
    # Once per model and machine, and the longest wait of a first start (torch loads, traces and writes the graph).
    label = f"{path.resolve().name} to ONNX (once)"
    with Progress(label, None, action="exporting", finished="exported", unit=None, logger=log):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise ExportError(f"exporting {path} to ONNX failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def export(path: Path, target: Path, kind: EncoderKind) -> None:
    """Write ``path``'s encoder as ONNX: inputs ``input_ids``, ``attention_mask``, ``token_type_ids``; output
    ``last_hidden_state`` (embedding models) or ``logits`` (cross-encoders)."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if kind == "cross-encoder":
        model: Any = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        output = "logits"
    else:
        model = AutoModel.from_pretrained(str(path)).eval()
        output = "last_hidden_state"

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return getattr(out, output)

    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]] * 2)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=4096)
    names = ("input_ids", "attention_mask", "token_type_ids")
    with torch.inference_mode():
        torch.onnx.export(
            Wrapped(model),
            (ids, (ids != 0).long(), torch.zeros_like(ids)),
            str(target),
            input_names=list(names),
            output_names=[output],
            dynamic_shapes={name: {0: batch, 1: seq} for name in names},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])  # type: ignore[arg-type]
