"""The fine-tuning jobs of one app: the job store in the cache directory, the runner, and what ties them to serving.

Only the served models that take adapters can be fine-tuned, so that a finished job's ``fine_tuned_model`` is
always servable here: a job names one by its served name, catalog id or alias, and trains on that model's weights
(the catalog model, or the GGUF file the server loads). When a job's worker has published the adapter, the runner
thread hands it to :meth:`FineTuning.serve_adapter`, which serves it on the event loop through the app's
:class:`AdapterManager` before the job is reported ``succeeded``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

from microserve.errors import InvalidRequest
from microserve.finetune.customization import Customizations
from microserve.finetune.extra import missing_extra
from microserve.finetune.jobs import FineTuningJobs, JobRunner, NotFound
from microserve.finetune.jobstore import JobRow, JobStore
from microserve.hardware import usable_cores
from microserve.server.adapters import AdapterManager
from microserve.settings import Settings

log = logging.getLogger(__name__)

SERVE_TIMEOUT = 600.0


class FineTuning:
    """The store, runner and API objects of an app's fine-tuning jobs."""

    def __init__(self, settings: Settings, adapters: AdapterManager, loaded: Callable[[], bool]) -> None:
        self.adapters = adapters
        self._loaded = loaded
        self._loop: asyncio.AbstractEventLoop | None = None
        self.store = JobStore(settings.resolved_fine_tuning_dir())
        self.threads = settings.fine_tuning_threads or max(1, usable_cores() // 2)
        self.runner = JobRunner(
            self.store,
            lora_dir=settings.resolved_lora_dir(),
            cache_dir=settings.cache_dir,
            catalog_dir=settings.catalog_dir,
            threads=self.threads,
            nice=settings.fine_tuning_nice,
            on_success=self.serve_adapter,
        )
        self.jobs = FineTuningJobs(
            self.store,
            self.runner,
            max_file_bytes=settings.max_upload_bytes,
            tunable=self.tunable,
            base_of=self.base_of,
            max_rank=settings.max_lora_rank,
        )
        self.customizations = Customizations(self.jobs)

    # -- which models -----------------------------------------------------------------------------------------

    def tunable(self, model: str) -> str | None:
        """Why ``model`` cannot be fine-tuned here, or None when it can; a 404 when no served model has that name."""
        if not self.adapters.enabled:
            # Like a name no served model has: there is no model here to fine-tune.
            raise NotFound(
                "no served model takes LoRA adapters, so none can be fine-tuned here",
                param="model",
                code="model_not_found",
            )
        if self.adapters.base_model(model) is None:
            names = ", ".join(b.name for b in self.adapters.base_models())
            raise NotFound(
                f"The model `{model}` does not exist or cannot be fine-tuned here; fine-tune a served base model: "
                f"{names}",
                param="model",
                code="model_not_found",
            )
        return missing_extra("fine-tuning")

    def base_of(self, model: str) -> str:
        """What the trainer loads for a tunable ``model``: the catalog id, or the served GGUF file."""
        base = self.adapters.base_model(model)
        assert base is not None  # tunable() said so
        return base.manifest.id if base.builtin else str(base.path)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Recover the jobs a previous process left, and start running queued ones."""
        self._loop = loop
        self.runner.start()

    def stop(self) -> None:
        """Stop the running job (it is marked failed: the server is going away) and the runner."""
        self.runner.stop()

    # -- serving a finished job's adapter ---------------------------------------------------------------------

    def serve_adapter(self, job: JobRow) -> None:
        """Serve the adapter a job published; runs in the runner's thread, raises when it cannot be served."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the server is not running")
        future = asyncio.run_coroutine_threadsafe(self._serve(str(job.fine_tuned_model)), loop)
        try:
            future.result(SERVE_TIMEOUT)
        except FutureTimeout:
            future.cancel()
            raise RuntimeError(f"loading the adapter took longer than {SERVE_TIMEOUT:.0f}s") from None

    async def _serve(self, name: str) -> None:
        # A job that ends while the engines load waits for them (readiness is a flag the loader sets, not an event).
        while not self._loaded():  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        if any(a.name == name for a in self.adapters.served()):
            return  # a rescan of the directory found it first
        try:
            await self.adapters.load(name, None, origin="directory")
        except InvalidRequest as exc:
            if exc.code != "adapter_exists":
                raise
        log.info("fine-tuned adapter %s is served", name)
