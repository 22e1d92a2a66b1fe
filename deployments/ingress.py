"""The ingress deployment: OpenAI's Videos API, driving encoder -> denoiser -> decoder handles."""

# No `from __future__ import annotations` here: FastAPI must see real types on the routes, and
# Serve's class-based ingress resolves them at import time.
import asyncio
import base64
import logging
import re
import time
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

import kinoray
from kinoray.deployments.api import (
    ERROR_RESPONSES,
    MAX_BODY_BYTES,
    REFERENCE_PENDING,
    APIError,
    ImageGenerateBody,
    VideoCreateBody,
    VideoRemixBody,
    check_auth,
    parse_create,
    parse_images,
    read_body,
    read_input_reference,
    validate_body,
)
from kinoray.deployments.http import IMAGE_MEDIA, byte_range_response, convert_image
from kinoray.deployments.store import (
    PROGRESS_INTERVAL_S,
    JobError,
    JobRecord,
    JobStore,
    created_at,
    new_job_id,
    replica_id,
)
from kinoray.deployments.webhooks import Outbox
from kinoray.models import telemetry
from kinoray.models.config import KinorayConfig
from kinoray.models.images import image_digest
from kinoray.models.request import RequestError, lora_key, parse_loras

log = logging.getLogger(__name__)

api = FastAPI(
    title="kinoray",
    description="Self-hosted, OpenAI-compatible Videos API on Ray Serve",
    version=kinoray.__version__,
)

# A replica that dies mid-request is replaced by Serve; the job is tried again this often. Stage
# code turns model errors into row errors, so what is raised here is the system's, not the row's:
# a dead replica directly, or wrapped by Serve when it fed a chained request.
ATTEMPTS = 3
REPLICA_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError, RayServeException)
# A replica renews its lease this often; a job whose owner's lease is older belongs to nobody
# (its replica died) and is taken over (see ServeConfig.on_restart).
LEASE_RENEW_S = 2.0
LEASE_STALE_S = 10.0
FINISHED = ("completed", "failed")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    param = str(err["loc"][-1]) if err.get("loc") else None
    return APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value").response()


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
        code = "method_not_allowed"
    return APIError(exc.status_code, str(exc.detail), code=code, headers=headers or None).response()


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return APIError(
        500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"
    ).response()


def _allowed_methods(request: Request) -> list[str]:
    """The methods the request's path takes, from the OpenAPI document (Serve mounts the class's
    routes under one router, so the app's route list does not show them)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


class _Auth:
    keys: list[str] = []

    def __call__(self, request: Request) -> None:
        check_auth(request, self.keys)


auth = _Auth()

# The body is parsed by hand (JSON or multipart, as the openai client sends it): document it here.
CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": VideoCreateBody.model_json_schema()}
            for media in ("application/json", "multipart/form-data")
        },
    }
}


@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: dict[str, Any],
        encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        decoder: DeploymentHandle,
    ):
        self.config = KinorayConfig.model_validate(config)
        self.serve_config = self.config.serve
        auth.keys = list(self.serve_config.api_keys)
        self.store = JobStore(self.serve_config.storage)
        self.builder = self.config.request_builder()
        self.images = self.config.images
        self.model_name = self.config.model.weights
        self.served_models = [self.model_name, *self.serve_config.model_aliases]
        self.encoder, self.denoiser, self.decoder = encoder, denoiser, decoder
        self.jobs: dict[str, asyncio.Task[None]] = {}
        # The records of the jobs this replica runs, as it last wrote them, and their progress
        # as last read (progress files change at most every PROGRESS_INTERVAL_S): status polls
        # of running jobs are answered from memory.
        self.live: dict[str, JobRecord] = {}
        self.progress_read: dict[str, tuple[float, int | None]] = {}
        self.images_in_flight = 0
        self.outbox = Outbox(self.store, self.serve_config.webhooks)
        self.owner = replica_id()
        self.draining = False
        self.store.renew_lease(self.owner)
        self._housekeeping: asyncio.Task[None] | None = None
        self._start_housekeeping()

    def _start_housekeeping(self) -> None:
        if self._housekeeping is None or self._housekeeping.done():
            try:
                self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
            except RuntimeError:  # no loop yet: the first request starts it
                pass

    # -- routes -------------------------------------------------------------------------------

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> JSONResponse:
        """200 while serving; 503 while draining, so that load balancers route elsewhere."""
        self._start_housekeeping()
        body = {
            "status": "draining" if self.draining else "ok",
            "model": self.model_name,
            "jobs_in_flight": len(self.jobs),
        }
        return JSONResponse(body, status_code=503 if self.draining else 200)

    async def check_health(self) -> None:
        """Serve's periodic health check; also keeps the housekeeping loop running."""
        self._start_housekeeping()

    @api.api_route(
        "/v1/models", methods=["GET", "HEAD"], dependencies=[Depends(auth)], responses=ERROR_RESPONSES
    )
    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "kinoray"} for m in self.served_models
            ],
        }

    @api.api_route(
        "/v1/models/{model}", methods=["GET", "HEAD"], dependencies=[Depends(auth)], responses=ERROR_RESPONSES
    )
    async def retrieve_model(self, model: str) -> dict[str, Any]:
        if model not in self.served_models:
            raise APIError(404, f"model {model!r} is not served here", param="model", code="model_not_found")
        return {"id": model, "object": "model", "created": 0, "owned_by": "kinoray"}

    @api.post(
        "/v1/videos", dependencies=[Depends(auth)], openapi_extra=CREATE_BODY, responses=ERROR_RESPONSES
    )
    async def create_video(self, request: Request) -> JSONResponse:
        # Room for a reference image of the configured size, base64-encoded in a JSON body.
        data = await read_body(request, MAX_BODY_BYTES + self.images.max_bytes * 4 // 3 + 4)
        job_id = new_job_id()
        reference = data.pop("input_reference", None)
        req, model = parse_create(
            {**data, **({"input_reference": REFERENCE_PENDING} if reference is not None else {})},
            self.served_models,
            self.builder,
            job_id,
        )
        digest = None
        if reference is not None:
            self._admit()  # before fetching anything
            s = req.sampling
            raw = await read_input_reference(reference, self.images, s.width, s.height)
            digest = image_digest(raw)
            url = await asyncio.to_thread(self.store.put_reference, job_id, raw)
            req = req.model_copy(update={"image": url})
        duration = req.sampling.num_frames / req.sampling.fps
        record = JobRecord(
            id=job_id,
            model=model,
            prompt=req.prompt,
            # `seconds` as the client sent it (OpenAI's clients compare it); the clip's exact
            # length, after snapping to the frames the model makes, is `duration_s`.
            seconds=str(data["seconds"]) if data.get("seconds") is not None else f"{duration:g}",
            duration_s=round(duration, 3),
            size=f"{req.sampling.width}x{req.sampling.height}",
            seed=req.seed,
            input_reference_sha256=digest,
            lora=[ref.model_dump() for ref in req.lora] or None,
            request=req.row(),
            deadline_at=time.time() + self.serve_config.job_deadline_s,
        )
        try:
            return self._accept(record)
        except APIError:
            if reference is not None:
                self.store.delete_reference(job_id)
            raise

    @api.post("/v1/videos/{video_id}/remix", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def remix_video(self, video_id: str, request: Request) -> JSONResponse:
        """A new job with the source's request and seed, and the new prompt (see README)."""
        source = self._get(video_id)
        prompt = validate_body(VideoRemixBody, await read_body(request)).prompt
        job_id = new_job_id()
        fields = {k: v for k, v in source.request.items() if v is not None}
        if fields.get("image"):
            # The remix keeps a copy of the reference: either job can be deleted alone.
            self._admit()
            fields["image"] = await asyncio.to_thread(self.store.copy_reference, source.id, job_id)
        try:
            req = self.builder.build({**fields, "id": job_id, "prompt": prompt})
        except RequestError as exc:
            raise APIError(400, str(exc), param="prompt" if exc.field == "prompt" else exc.field) from None
        record = source.model_copy(
            update={
                "id": job_id,
                "prompt": req.prompt,
                "status": "queued",
                "progress": 0,
                "created_at": int(time.time()),
                "completed_at": None,
                "expires_at": None,
                "error": None,
                "remixed_from_video_id": source.id,
                "denoised_by": None,
                "request": req.row(),
                "deadline_at": time.time() + self.serve_config.job_deadline_s,
            }
        )
        return self._accept(record)

    def _accept(self, record: JobRecord) -> JSONResponse:
        """Store a new job and start it; 503 while draining, 429 over the queue's bound."""
        self._admit()
        record = record.model_copy(update={"owner": self.owner})
        self.store.put(record)
        self.live[record.id] = record
        self._start(record)
        return JSONResponse(record.public(), headers=self._poll_headers())

    def _admit(self) -> None:
        """Raises 503 while draining, 429 when the queue is full."""
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down; retry on another replica",
                type="server_error",
                code="server_shutting_down",
                headers={"Retry-After": str(self.serve_config.retry_after_s)},
            )
        # Serve's max_queued_requests bounds requests waiting for a replica, but a video job
        # outlives its HTTP request: the backlog is counted here, where the jobs are held.
        if len(self.jobs) >= self.serve_config.max_queued_requests:
            raise APIError(
                429,
                f"too many video jobs in flight ({len(self.jobs)}); retry later",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(self.serve_config.retry_after_s)},
            )

    def _start(self, record: JobRecord) -> None:
        self._start_housekeeping()
        task = asyncio.get_running_loop().create_task(self._run(record))
        self.jobs[record.id] = task
        telemetry.set_gauge("kinoray_jobs_in_flight", len(self.jobs))
        task.add_done_callback(lambda _: self._done(record.id))

    def _poll_headers(self) -> dict[str, str]:
        # The openai client waits this long between polls of `create_and_poll` / `poll`.
        return {"openai-poll-after-ms": str(self.serve_config.poll_after_ms)}

    @api.api_route(
        "/v1/videos", methods=["GET", "HEAD"], dependencies=[Depends(auth)], responses=ERROR_RESPONSES
    )
    async def list_videos(
        self,
        after: str | None = None,
        limit: int = Query(default=20, ge=1, le=100),
        order: str = Query(default="desc", pattern="^(asc|desc)$"),
    ) -> dict[str, Any]:
        ids = self.store.ids()
        if order == "desc":
            ids.reverse()
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        # One listing of names, then only the page's records are read.
        page = [r.public() for r in map(self._current, ids[:limit]) if r is not None]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ids) > limit,
        }

    @api.api_route(
        "/v1/videos/{video_id}",
        methods=["GET", "HEAD"],
        dependencies=[Depends(auth)],
        responses=ERROR_RESPONSES,
    )
    async def retrieve_video(self, video_id: str) -> JSONResponse:
        return JSONResponse(self._get(video_id).public(), headers=self._poll_headers())

    @api.api_route(
        "/v1/videos/{video_id}/content",
        methods=["GET", "HEAD"],
        dependencies=[Depends(auth)],
        responses=ERROR_RESPONSES,
    )
    async def video_content(self, video_id: str, request: Request, variant: str = "video") -> Response:
        """The MP4 (or PNG for one frame), or its `thumbnail` (WebP) or `spritesheet` (JPEG);
        byte ranges as RFC 9110 gives them."""
        record = self._get(video_id)
        if variant not in ("video", *JobStore.VARIANTS):
            raise APIError(
                400,
                f"variant must be one of video, thumbnail, spritesheet (got {variant!r})",
                param="variant",
            )
        if record.status != "completed":
            raise APIError(409, f"video {video_id} is {record.status}, not completed", code="video_not_ready")
        found = self.store.get_video(video_id, variant)
        if found is None:
            raise APIError(
                404, f"video {video_id} has no {variant} content", param="variant", code="not_found"
            )
        return byte_range_response(request, *found)

    @api.delete("/v1/videos/{video_id}", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def delete_video(self, video_id: str) -> dict[str, Any]:
        """Delete the job and every file of it; an unfinished job's compute stops at its next
        denoising step (here, or, through its record's removal, on any replica)."""
        record = self._get(video_id)
        task = self.jobs.pop(video_id, None)
        if task is not None:
            task.cancel()
            # Its stage calls are cancelled as the task unwinds: let that reach the replicas
            # before the record goes (which the denoiser would notice a little later).
            await asyncio.wait([task], timeout=1.0)
        self.live.pop(video_id, None)
        self.store.delete(video_id)
        if record.status not in FINISHED:
            telemetry.inc("kinoray_jobs_cancelled_total", kind="video")
            self.outbox.publish("video.cancelled", video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @api.post(
        "/v1/images/generations",
        dependencies=[Depends(auth)],
        responses=ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ImageGenerateBody.model_json_schema()}},
            }
        },
    )
    async def generate_images(self, request: Request) -> dict[str, Any]:
        """OpenAI's Images API: synchronous, one single-frame request per image. A client that
        disconnects stops the compute of its images."""
        data = await read_body(request)
        ids = [new_job_id().replace("video_", "img_") for _ in range(10)]
        body, reqs = parse_images(data, self.served_models, self.builder, ids)
        if self.draining or len(self.jobs) + self.images_in_flight >= self.serve_config.max_queued_requests:
            raise APIError(
                503 if self.draining else 429,
                "the server is shutting down" if self.draining else "too many jobs in flight; retry later",
                type="server_error" if self.draining else "rate_limit_exceeded",
                code="server_shutting_down" if self.draining else "queue_full",
                headers={"Retry-After": str(self.serve_config.retry_after_s)},
            )
        self.images_in_flight += len(reqs)
        try:
            results = await asyncio.gather(*(self._generate(r.row()) for r in reqs))
        except asyncio.CancelledError:
            telemetry.inc("kinoray_jobs_cancelled_total", len(reqs), kind="image")
            raise
        finally:
            self.images_in_flight -= len(reqs)
        failed = next((r["error"] for r in results if r["error"]), None)
        if failed:
            raise APIError(
                500, f"image generation failed: {failed}", type="server_error", code="generation_failed"
            )
        data_out = []
        suffix = {"png": "png", "jpeg": "jpg", "webp": "webp"}[body.output_format]
        for req, result in zip(reqs, results):
            image = convert_image(result["video"], body.output_format, body.output_compression)
            if body.response_format == "b64_json":
                data_out.append({"b64_json": base64.b64encode(image).decode()})
            else:
                self.store.put_image(req.id, image, suffix)
                data_out.append(
                    {"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{req.id}.{suffix}"}
                )
        telemetry.inc("kinoray_videos_total", len(reqs), frontend="online")
        size = f"{reqs[0].sampling.width}x{reqs[0].sampling.height}"
        return {
            "created": int(time.time()),
            "data": data_out,
            "output_format": body.output_format,
            "size": size,
        }

    @api.api_route(
        "/v1/images/files/{name}",
        methods=["GET", "HEAD"],
        dependencies=[Depends(auth)],
        responses=ERROR_RESPONSES,
    )
    async def image_file(self, name: str, request: Request) -> Response:
        """An image made with `response_format: url`; under the API keys like every route."""
        image_id, _, suffix = name.rpartition(".")
        found = self.store.get_image(image_id, suffix) if suffix in IMAGE_MEDIA else None
        if found is None:
            raise APIError(404, f"no image {name!r}", param="name", code="not_found")
        return byte_range_response(request, found, IMAGE_MEDIA[suffix])

    # -- the job -----------------------------------------------------------------------------

    def _done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.live.pop(job_id, None)
        self.progress_read.pop(job_id, None)
        telemetry.set_gauge("kinoray_jobs_in_flight", len(self.jobs))

    def _update(self, job_id: str, **changes: Any) -> JobRecord | None:
        record = self.store.update(job_id, **changes)
        if record is not None and job_id in self.jobs:
            self.live[job_id] = record
        return record

    def _read(self, video_id: str) -> JobRecord | None:
        """A job's record: from memory for a job running here (with its progress re-read at
        most every PROGRESS_INTERVAL_S), else from storage."""
        record = self.live.get(video_id)
        if record is None:
            return self.store.get(video_id)
        if record.status not in FINISHED:
            now = time.monotonic()
            read_at, progress = self.progress_read.get(video_id, (0.0, None))
            if now - read_at >= PROGRESS_INTERVAL_S:
                progress = self.store.get_progress(video_id)
                self.progress_read[video_id] = (now, progress)
            if progress is not None and progress > record.progress:
                record = record.model_copy(update={"progress": progress, "status": "in_progress"})
        return record

    def _get(self, video_id: str) -> JobRecord:
        record = self._current(video_id) if self.store.valid_id(video_id) else None
        if record is None:
            raise APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return record

    def _current(self, video_id: str) -> JobRecord | None:
        """The record as of now: None once expired; failed once past its deadline unfinished
        (its owner died and nobody took it over)."""
        record = self._read(video_id)
        if record is None:
            return None
        now = time.time()
        if record.expires_at is not None and record.expires_at <= now:
            self.store.delete(video_id)
            return None
        if record.status not in FINISHED and now > record.deadline_at:
            error = JobError(code="deadline_exceeded", message="the job did not finish before its deadline")
            return self._finish(record.id, "failed", error=error) or record
        return record

    async def _run(self, record: JobRecord) -> None:
        row = dict(record.request)
        self._update(record.id, status="in_progress")
        try:
            result = await asyncio.wait_for(self._generate(row), timeout=record.deadline_at - time.time())
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self._fail(record.id, "deadline_exceeded", "the job did not finish before its deadline")
            return
        except Exception as exc:
            log.exception("job %s failed", record.id)
            self._fail(record.id, "generation_failed", f"{type(exc).__name__}: {exc}")
            return
        if result["error"]:
            reason = result.get("error_reason") or ""
            code = reason if reason.islower() and reason.replace("_", "").isalpha() else "generation_failed"
            self._fail(record.id, code, result["error"])
            return
        if self.store.get(record.id) is None:  # deleted while its last stage ran
            return
        variants = {name: result[name] for name in JobStore.VARIANTS if result.get(name)}
        self.store.put_video(record.id, result["video"], result["suffix"], variants)
        if self._finish(record.id, "completed", progress=100, denoised_by=result.get("denoised_by")) is None:
            self.store.delete(record.id)  # deleted while its files were written
            return
        telemetry.inc("kinoray_videos_total", frontend="online")
        telemetry.inc("kinoray_frames_total", int(record.request["num_frames"]), frontend="online")

    def _finish(self, job_id: str, status: str, **changes: Any) -> JobRecord | None:
        """Record a job's end (its expiry, its event) and drop its progress file."""
        now = int(time.time())
        retention = self.serve_config.retention_s
        record = self._update(
            job_id,
            status=status,
            completed_at=now,
            expires_at=now + int(retention) if retention is not None else None,
            **changes,
        )
        self.store.delete_progress(job_id)
        if record is not None:
            self.outbox.publish(f"video.{status}", job_id)
        return record

    async def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        # A request with LoRA adapters goes to a denoiser replica holding its adapter set.
        adapter_set = lora_key(parse_loras(row.get("lora")))
        denoiser = self.denoiser.options(multiplexed_model_id=adapter_set) if adapter_set else self.denoiser
        for attempt in range(1, ATTEMPTS + 1):
            responses = []
            try:
                # Responses are passed on unresolved: embeddings and latents go replica to
                # replica through the object store, never through the ingress.
                responses.append(self.encoder.remote(row))
                responses.append(denoiser.remote(responses[0]))
                responses.append(self.decoder.remote(responses[1]))
                return await responses[2]
            except asyncio.CancelledError:
                # Serve passes the cancellation on to the replicas: the denoiser drops the row
                # from its batch at the next step.
                for response in responses:
                    response.cancel()
                raise
            except REPLICA_ERRORS:
                if attempt == ATTEMPTS:
                    raise
                log.warning(
                    "a stage replica died during job %s; trying again (%d/%d)", row["id"], attempt, ATTEMPTS
                )
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self._finish(job_id, "failed", error=JobError(code=code, message=message))
        telemetry.inc("kinoray_errors_total", stage="job", reason=code)

    # -- housekeeping: leases, orphaned jobs, expiry, webhooks -------------------------------

    async def _housekeep(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                self.store.renew_lease(self.owner)
                await self.outbox.deliver_due()
                if time.monotonic() - last_sweep >= self.serve_config.sweep_interval_s:
                    last_sweep = time.monotonic()
                    self._adopt_orphans()
                    self._sweep_expired()
            except Exception:
                log.exception("housekeeping failed; trying again")
            await asyncio.sleep(min(LEASE_RENEW_S, self.serve_config.sweep_interval_s))

    def _adopt_orphans(self) -> int:
        """Unfinished jobs whose replica is gone (no fresh lease): run them again here, or end
        them `failed: interrupted` (ServeConfig.on_restart)."""
        if self.draining:
            return 0
        adopted = 0
        ages: dict[str, float | None] = {}  # one lease read per owner, not per job
        for job_id in self.store.active():
            if job_id in self.jobs:
                continue
            record = self.store.get(job_id)
            if record is None or record.status in FINISHED or record.owner == self.owner:
                continue
            if record.owner and record.owner not in ages:
                ages[record.owner] = self.store.lease_age(record.owner)
            age = ages.get(record.owner) if record.owner else None
            if age is not None and age < LEASE_STALE_S:
                continue
            if self.serve_config.on_restart == "fail":
                self._fail(job_id, "interrupted", "the server running the job stopped before it finished")
                continue
            if len(self.jobs) >= self.serve_config.max_queued_requests:
                break
            log.warning("job %s lost its replica; running it again", job_id)
            self.store.delete_progress(job_id)
            taken = self.store.update(job_id, owner=self.owner, status="queued", progress=0)
            if taken is not None:
                self.live[job_id] = taken
                self._start(taken)
                adopted += 1
        return adopted

    def _sweep_expired(self) -> int:
        """Delete finished jobs and image files past their retention; ids give their age, so
        only old enough ones are read."""
        retention = self.serve_config.retention_s
        if retention is None:
            return 0
        now = time.time()
        removed = 0
        for job_id in self.store.ids():
            if created_at(job_id) + retention > now:
                break  # ids sort by creation time: the rest are younger
            if self._current(job_id) is None:
                removed += 1
        for image_id, suffix in self.store.images():
            if created_at(image_id) + retention <= now:
                self.store.delete_image(image_id, suffix)
                removed += 1
        return removed

    async def drain(self, timeout_s: float) -> dict[str, int]:
        """Stop taking jobs, wait up to `timeout_s` for those in flight, then hand the rest over:
        this replica's lease is dropped, so the next replica to start runs them again."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = list(self.jobs)
        for task in list(self.jobs.values()):
            task.cancel()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await self.outbox.deliver_due()  # events of the jobs that just finished; failures wait in the outbox
        self.store.drop_lease(self.owner)
        return {"unfinished": len(left)}
