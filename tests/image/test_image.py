"""The CPU image, built by buildah from deploy/docker/Dockerfile on a debootstrapped Debian base, run from its own
filesystem as a container runtime would: read-only root, the image's numeric user, environment, entry point and
working directory, the cache on a writable volume, and a network namespace with nothing but loopback."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from image_harness import (
    BUILD_HOST,
    BUILT_WITH,
    TIMINGS,
    ImageConfig,
    NetNamespace,
    process_ids,
    project_version,
    run,
    snapshot,
)

CHAT = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"
COMPILERS = ("gcc", "g++", "cc", "c++", "cpp", "clang", "x86_64-linux-gnu-gcc-12", "cmake", "ninja")


def test_config_is_what_a_runtime_needs(config: ImageConfig) -> None:
    uid, _, gid = config.user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without the image's passwd.
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0, config.user
    assert config.raw["StopSignal"] == "SIGTERM"
    assert "/cache" in (config.raw.get("Volumes") or {})
    assert "8000/tcp" in (config.raw.get("ExposedPorts") or {})
    env = config.env
    assert env["MICROSERVE_CACHE"] == "/cache"
    assert env["MICROSERVE_HOST"] == "0.0.0.0"
    # The port stays the settings' default, so NIM_SERVER_PORT (which MICROSERVE_PORT would override) still works.
    assert "MICROSERVE_PORT" not in env and "NIM_SERVER_PORT" not in env
    assert config.argv == ["microserve", "serve"]
    assert config.healthcheck[-3:-1] == ["-m", "microserve.healthcheck"]
    assert config.start_period > 0
    labels = config.labels
    assert labels["org.opencontainers.image.title"] == "microserve"
    assert labels["org.opencontainers.image.version"] == BUILT_WITH["VERSION"] == project_version()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"] == BUILT_WITH["BASE_IMAGE"]
    assert labels["org.opencontainers.image.revision"] == BUILT_WITH["REVISION"]


def test_ships_no_compiler_and_nothing_the_build_borrowed(rootfs: Path, config: ImageConfig) -> None:
    path = config.env["PATH"].split(":")
    found = [f"{d}/{tool}" for d in path for tool in COMPILERS if (rootfs / d.lstrip("/") / tool).exists()]
    assert not found, found
    assert not list((rootfs / "usr/lib/gcc").glob("*/*/cc1*")), "the C compiler proper is in the image"
    assert not (rootfs / "src").exists(), "the build stage's sources are in the image"
    # The build's --volume mounts leave their mount points behind (buildah's behaviour), but nothing in them.
    lent = rootfs / BUILD_HOST.lstrip("/")
    leftovers = [p for p in lent.rglob("*") if p.is_file() and p.stat().st_size] if lent.exists() else []
    assert not leftovers, leftovers


def test_models_are_in_the_cache_owned_by_the_user(rootfs: Path, config: ImageConfig) -> None:
    uid = int(config.user.split(":")[0])
    cache = rootfs / "cache"
    gguf = {path.parent.name: path.stat().st_size for path in (cache / "models" / CHAT).glob("*/*.gguf")}
    onnx = list((cache / "onnx").glob("*/model.onnx"))
    # The shipped Q4_1 file and the F16 one `microserve pull` made from it at build time (the default profile).
    assert set(gguf) == {"llamacpp-cpu-q4_1", "llamacpp-cpu-f16"}, gguf
    assert gguf["llamacpp-cpu-q4_1"] > 50_000_000 and gguf["llamacpp-cpu-f16"] > 2.5 * gguf["llamacpp-cpu-q4_1"]
    assert len(onnx) == 1 and onnx[0].stat().st_size > 50_000_000, onnx
    for path in [cache, *cache.rglob("*")]:
        assert path.stat().st_uid == uid, path


@pytest.fixture
def volume(rootfs: Path, tmp_path: Path) -> Path:
    """The cache volume: a copy of the image's /cache, as a new named volume (or the chart's seed step) starts."""
    target = tmp_path / "cache"
    target.mkdir()
    run(["cp", "-a", f"{rootfs}/cache/.", f"{target}/"])
    return target


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    with NetNamespace(f"microserve-image-{os.getpid()}") as ns:
        yield ns


def wait_ready(ns: NetNamespace, process: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    started = time.monotonic()
    with ns.entered():
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get("http://127.0.0.1:8000/v1/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise AssertionError(f"not ready within {timeout:.0f} s:\n{log.read_text()}")


def test_serves_offline_as_non_root_then_drains_on_sigterm(
    rootfs: Path, config: ImageConfig, volume: Path, netns: NetNamespace, tmp_path: Path
) -> None:
    # Nothing to reach but loopback: the server has to start from what the image holds.
    assert netns.interfaces() == ["lo"]
    assert netns.routes() == []
    before = snapshot(volume)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = netns.launch(rootfs, volume, config, config.argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        ready_in = wait_ready(netns, server, log, config.start_period)
        TIMINGS["ready after start, from the image"] = ready_in

        uids, gids = process_ids(server.pid)
        assert set(uids) == {int(config.user.split(":")[0])} and 0 not in uids, uids
        assert set(gids) == {int(config.user.split(":")[1])}, gids
        assert Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"/microserve")

        status, said = run_healthcheck(netns, rootfs, volume, config)
        assert status == 0, said

        with netns.entered():
            client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0, timeout=60)
            assert {m.id for m in client.models.list()} >= {CHAT, EMBEDDING}
            reply = client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24,
                temperature=0,
            )
            # The README's question, answered right by the default profile made at build time.
            assert "Paris" in (reply.choices[0].message.content or ""), reply
            info = {m["shortName"]: m for m in httpx.get("http://127.0.0.1:8000/v1/metadata").json()["modelInfo"]}
            assert info[CHAT]["profile"] == "llamacpp-cpu-f16", info
            assert reply.usage is not None and reply.usage.completion_tokens > 0
            vectors = client.embeddings.create(model=EMBEDDING, input=["a cat sat on the mat", "stock markets fell"])
            assert [len(item.embedding) for item in vectors.data] == [384, 384]
            assert math.isclose(math.fsum(x * x for x in vectors.data[0].embedding), 1.0, rel_tol=1e-3)

            # A stream in flight when SIGTERM arrives runs to its end; meanwhile readiness and new requests say 503.
            # 240 tokens: the F16 default decodes one stream at 20-50 tok/s on 2 busy cores, well inside the 30 s drain.
            stream = client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": "Count to one thousand."}],
                max_tokens=240,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            chunks = iter(stream)
            first = next(chunks)
            server.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            status, said = run_healthcheck(netns, rootfs, volume, config)
            assert status == 1 and " 503 " in said, said
            with pytest.raises(openai.APIStatusError) as refused:
                client.models.list()
            assert refused.value.status_code == 503
            rest = list(chunks)
        usage = rest[-1].usage
        assert first.choices and usage is not None and usage.completion_tokens == 240, rest[-3:]
        assert server.wait(timeout=60) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # Nothing was downloaded, exported or placed at start: the models in the cache are as the image built it (the
    # fine-tuning jobs' state directory is the server's own and is made at start).
    after = {path: entry for path, entry in snapshot(volume).items() if not path.startswith("fine_tuning/")}
    assert after == before
    text = log.read_text()
    assert "drained; shutting down" in text, text


def run_healthcheck(ns: NetNamespace, rootfs: Path, volume: Path, config: ImageConfig) -> tuple[int, str]:
    """The image's HEALTHCHECK command, run beside the server as a runtime runs it: exit status and what it said."""
    probe = ns.launch(rootfs, volume, config, config.healthcheck, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = probe.communicate(timeout=60)
    return probe.returncode, out.decode(errors="replace")


def test_health_check_is_unhealthy_with_no_server(
    rootfs: Path, config: ImageConfig, volume: Path, netns: NetNamespace
) -> None:
    status, said = run_healthcheck(netns, rootfs, volume, config)
    assert status == 1 and "127.0.0.1:8000" in said, said
