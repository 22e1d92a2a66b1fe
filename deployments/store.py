"""Job records, step progress and finished videos in storage (any fsspec URL).

Everything an API answer needs lives here, not in a replica's memory: any ingress replica can
answer for any job, and a restart of the application loses no finished video.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, Field

from kinoray.models.request import ID_PATTERN

Status = Literal["queued", "in_progress", "completed", "failed"]


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str | None = None


class JobRecord(BaseModel):
    """OpenAI's `video` object, plus what kinoray needs to run and audit the job."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status = "queued"
    progress: int = 0
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    seconds: str
    size: str
    remixed_from_video_id: str | None = None
    error: JobError | None = None
    # kinoray's own fields
    duration_s: float | None = None
    seed: int
    request: dict[str, Any]
    deadline_at: float

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"request", "deadline_at"})


def new_job_id() -> str:
    # Time first (like a ULID): ids sort in creation order, which listing pages rely on.
    return f"video_{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


class JobStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        for sub in ("jobs", "videos", "progress", "images", "latents"):
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)

    @staticmethod
    def valid_id(job_id: str) -> bool:
        return bool(ID_PATTERN.match(job_id))

    def _path(self, kind: str, job_id: str, suffix: str = "") -> str:
        if not self.valid_id(job_id):  # ids come from URLs: never let one name a path elsewhere
            raise KeyError(job_id)
        return f"{self.root}/{kind}/{job_id}{suffix}"

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def put(self, record: JobRecord) -> None:
        self._write(self._path("jobs", record.id, ".json"), record.model_dump_json().encode())

    def get(self, job_id: str) -> JobRecord | None:
        try:
            with self.fs.open(self._path("jobs", job_id, ".json"), "rb") as f:
                record = JobRecord.model_validate_json(f.read())
        except (KeyError, FileNotFoundError):
            return None
        if record.status in ("queued", "in_progress"):
            progress = self.get_progress(job_id)
            if progress is not None and progress > record.progress:
                record.progress = progress
                record.status = "in_progress"
        return record

    def update(self, job_id: str, **changes: Any) -> JobRecord | None:
        record = self.get(job_id)
        if record is None:
            return None
        record = record.model_copy(update=changes)
        self.put(record)
        return record

    def ids(self) -> list[str]:
        """All job ids, oldest first (ids sort by creation time), from names alone."""
        names = (p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.root}/jobs/*.json"))
        return sorted(n.removesuffix(".json") for n in names)

    def delete(self, job_id: str) -> bool:
        found = False
        for kind, suffix in (
            ("jobs", ".json"),
            ("videos", ".mp4"),
            ("videos", ".png"),
            ("progress", ".json"),
            ("latents", ".safetensors"),
        ):
            path = self._path(kind, job_id, suffix)
            if self.fs.exists(path):
                self.fs.rm(path)
                found = found or kind == "jobs"
        return found

    def put_video(self, job_id: str, data: bytes, suffix: str) -> None:
        self._write(self._path("videos", job_id, suffix), data)

    def get_video(self, job_id: str) -> tuple[bytes, str] | None:
        for suffix, media in ((".mp4", "video/mp4"), (".png", "image/png")):
            path = self._path("videos", job_id, suffix)
            if self.fs.exists(path):
                with self.fs.open(path, "rb") as f:
                    return f.read(), media
        return None

    def put_latents(self, job_id: str, data: bytes) -> None:
        """A job's denoised latents that could not be decoded (see kinoray.models.latents)."""
        self._write(self._path("latents", job_id, ".safetensors"), data)

    def has_latents(self, job_id: str) -> bool:
        return bool(self.fs.exists(self._path("latents", job_id, ".safetensors")))

    def put_image(self, image_id: str, data: bytes) -> None:
        self._write(self._path("images", image_id, ".png"), data)

    def get_image(self, image_id: str) -> bytes | None:
        try:
            with self.fs.open(self._path("images", image_id, ".png"), "rb") as f:
                return f.read()
        except (KeyError, FileNotFoundError):
            return None

    def set_progress(self, job_id: str, percent: int) -> None:
        self._write(self._path("progress", job_id, ".json"), json.dumps({"progress": percent}).encode())

    def get_progress(self, job_id: str) -> int | None:
        try:
            with self.fs.open(self._path("progress", job_id, ".json"), "rb") as f:
                return int(json.loads(f.read())["progress"])
        except (FileNotFoundError, ValueError, KeyError):
            return None
