"""The encoder's forward pass on ONNX Runtime (CPU): padded batch in, unit embeddings or logits out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from microserve.engines.base import EncoderInput, EncoderKind
from microserve.engines.encoder.model_dir import DirectoryLayout, ModelDirError


class OnnxForward:
    """One ONNX Runtime session over an exported encoder; calls come from a single batching thread."""

    name = "onnxruntime"

    def __init__(
        self, onnx_path: Path, kind: EncoderKind, layout: DirectoryLayout, *, threads: int, pad_id: int
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # ONNX Runtime's workers spin between passes by default; in a server the same cores run the event loop
        # that feeds the next batch, so idle workers must sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._kind = kind
        self._layout = layout
        self._pad_id = pad_id
        self._output = "logits" if kind == "cross-encoder" else "last_hidden_state"
        outputs = [o.name for o in self._session.get_outputs()]
        if self._output not in outputs:
            raise ModelDirError(f"{onnx_path} has outputs {outputs}, not {self._output}")

    def __call__(self, batch: list[EncoderInput]) -> list[list[float]]:
        width = max(len(item.token_ids) for item in batch)
        ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, item in enumerate(batch):
            n = len(item.token_ids)
            ids[row, :n] = item.token_ids
            mask[row, :n] = 1
            if item.type_ids is not None:
                types[row, :n] = item.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        (out,) = self._session.run([self._output], feeds)
        if self._kind == "cross-encoder":
            if out.shape[-1] != 1:
                raise ModelDirError(f"a cross-encoder must have one output label, not {out.shape[-1]}")
            logits: list[list[float]] = out[:, :1].astype(np.float32).tolist()
            return logits
        vectors: list[list[float]] = self._pool(out.astype(np.float32), mask).tolist()
        return vectors

    def _pool(self, hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        if self._layout.pooling == "cls":
            pooled = hidden[:, 0]
        elif self._layout.pooling == "max":
            pooled = np.where(mask[..., None] > 0, hidden, -np.inf).max(axis=1)
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norms).astype(np.float32)
