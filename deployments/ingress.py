"""The ingress deployment: OpenAI's Videos API, driving encoder -> denoiser -> decoder handles."""

# No `from __future__ import annotations` here: FastAPI must see real types on the routes, and
# Serve's class-based ingress resolves them at import time.
import asyncio
import base64
import logging
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
    APIError,
    ImageGenerateBody,
    VideoCreateBody,
    check_auth,
    parse_create,
    parse_images,
    read_body,
)
from kinoray.deployments.store import JobError, JobRecord, JobStore, new_job_id
from kinoray.models import telemetry
from kinoray.models.config import KinorayConfig

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
    return APIError(exc.status_code, str(exc.detail), code=code).response()


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return APIError(
        500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"
    ).response()


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
        self.model_name = self.config.model.weights
        self.served_models = [self.model_name, *self.serve_config.model_aliases]
        self.encoder, self.denoiser, self.decoder = encoder, denoiser, decoder
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.images_in_flight = 0

    # -- routes -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "jobs_in_flight": len(self.jobs)}

    @api.get("/v1/models", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "kinoray"} for m in self.served_models
            ],
        }

    @api.post(
        "/v1/videos", dependencies=[Depends(auth)], openapi_extra=CREATE_BODY, responses=ERROR_RESPONSES
    )
    async def create_video(self, request: Request) -> JSONResponse:
        data = await read_body(request)
        job_id = new_job_id()
        req, model = parse_create(data, self.served_models, self.builder, job_id)
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
            request=req.row(),
            deadline_at=time.time() + self.serve_config.job_deadline_s,
        )
        self.store.put(record)
        task = asyncio.get_running_loop().create_task(self._run(record))
        self.jobs[job_id] = task
        telemetry.set_gauge("kinoray_jobs_in_flight", len(self.jobs))
        task.add_done_callback(lambda _: self._done(job_id))
        return JSONResponse(record.public())

    @api.get("/v1/videos", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
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
        page = [self._expire(r).public() for r in map(self.store.get, ids[:limit]) if r is not None]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ids) > limit,
        }

    @api.get("/v1/videos/{video_id}", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def retrieve_video(self, video_id: str) -> dict[str, Any]:
        return self._expire(self._get(video_id)).public()

    @api.get("/v1/videos/{video_id}/content", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def video_content(self, video_id: str, variant: str = "video") -> Response:
        record = self._get(video_id)
        if variant != "video":
            raise APIError(400, f"variant {variant!r} is not available; use 'video'", param="variant")
        if record.status != "completed":
            raise APIError(409, f"video {video_id} is {record.status}, not completed", code="video_not_ready")
        found = self.store.get_video(video_id)
        if found is None:
            raise APIError(404, f"video {video_id} has no content", code="not_found")
        data, media = found
        return Response(content=data, media_type=media)

    @api.delete("/v1/videos/{video_id}", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def delete_video(self, video_id: str) -> dict[str, Any]:
        self._get(video_id)
        task = self.jobs.pop(video_id, None)
        if task is not None:
            task.cancel()
        self.store.delete(video_id)
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
        """OpenAI's Images API: synchronous, one single-frame request per image."""
        data = await read_body(request)
        ids = [new_job_id().replace("video_", "img_") for _ in range(10)]
        body, reqs = parse_images(data, self.served_models, self.builder, ids)
        if len(self.jobs) + self.images_in_flight >= self.serve_config.max_queued_requests:
            raise APIError(
                429,
                "too many jobs in flight; retry later",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(self.serve_config.retry_after_s)},
            )
        self.images_in_flight += len(reqs)
        try:
            results = await asyncio.gather(*(self._generate(r.row()) for r in reqs))
        finally:
            self.images_in_flight -= len(reqs)
        failed = next((r["error"] for r in results if r["error"]), None)
        if failed:
            raise APIError(
                500, f"image generation failed: {failed}", type="server_error", code="generation_failed"
            )
        data_out = []
        for req, result in zip(reqs, results):
            if body.response_format == "b64_json":
                data_out.append({"b64_json": base64.b64encode(result["video"]).decode()})
            else:
                self.store.put_image(req.id, result["video"])
                data_out.append({"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{req.id}.png"})
        telemetry.inc("kinoray_videos_total", len(reqs), frontend="online")
        return {"created": int(time.time()), "data": data_out}

    @api.get("/v1/images/files/{name}", responses=ERROR_RESPONSES)
    async def image_file(self, name: str) -> Response:
        data = self.store.get_image(name.removesuffix(".png"))
        if data is None:
            raise APIError(404, f"no image {name!r}", param="name", code="not_found")
        return Response(content=data, media_type="image/png")

    # -- the job -----------------------------------------------------------------------------

    def _done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        telemetry.set_gauge("kinoray_jobs_in_flight", len(self.jobs))

    def _get(self, video_id: str) -> JobRecord:
        record = self.store.get(video_id) if self.store.valid_id(video_id) else None
        if record is None:
            raise APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return record

    def _expire(self, record: JobRecord) -> JobRecord:
        """A job past its deadline that no replica finished (its owner died) ends `failed`."""
        if record.status in ("queued", "in_progress") and time.time() > record.deadline_at:
            error = JobError(code="deadline_exceeded", message="the job did not finish before its deadline")
            return self.store.update(record.id, status="failed", error=error) or record
        return record

    async def _run(self, record: JobRecord) -> None:
        row = dict(record.request)
        self.store.update(record.id, status="in_progress")
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
        self.store.put_video(record.id, result["video"], result["suffix"])
        self.store.update(record.id, status="completed", progress=100, completed_at=int(time.time()))
        telemetry.inc("kinoray_videos_total", frontend="online")
        telemetry.inc("kinoray_frames_total", int(record.request["num_frames"]), frontend="online")

    async def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                # Responses are passed on unresolved: embeddings and latents go replica to
                # replica through the object store, never through the ingress.
                return await self.decoder.remote(self.denoiser.remote(self.encoder.remote(row)))
            except REPLICA_ERRORS:
                if attempt == ATTEMPTS:
                    raise
                log.warning(
                    "a stage replica died during job %s; trying again (%d/%d)", row["id"], attempt, ATTEMPTS
                )
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.store.update(job_id, status="failed", error=JobError(code=code, message=message))
        telemetry.inc("kinoray_errors_total", stage="job", reason=code)
