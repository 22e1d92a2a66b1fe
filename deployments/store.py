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
# The denoiser writes a job's progress at most this often (a PUT each on object storage).
PROGRESS_INTERVAL_S = 0.25


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
    input_reference_sha256: str | None = None  # SHA-256 of the reference image's file, hex
    lora: list[dict[str, Any]] | None = None  # the LoRA adapters applied: [{name, scale}]
    seed: int
    request: dict[str, Any]
    deadline_at: float
    owner: str | None = None  # the ingress replica running the job
    denoised_by: str | None = None  # the denoiser replica that made it

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude=INTERNAL_FIELDS)


INTERNAL_FIELDS = {"request", "deadline_at", "owner", "denoised_by"}


def replica_id() -> str:
    """The Serve replica this runs in (its unique id): a job's owner, a row's denoiser."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:
        return f"local-{uuid.uuid4().hex[:8]}"


def new_job_id() -> str:
    # Time first (like a ULID): ids sort in creation order, which listing pages rely on.
    return f"video_{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


def created_at(job_id: str) -> float:
    """When a job or image id (`video_...`, `img_...`) was made (Unix seconds), from the id."""
    try:
        return int(job_id.partition("_")[2][:16], 16) / 1e9
    except ValueError:
        return 0.0


class JobStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        for sub in (
            "jobs",
            "videos",
            "progress",
            "images",
            "latents",
            "active",
            "owners",
            "outbox",
            "references",
        ):
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
        """Write the record; an unfinished job is also listed in `active/` (see `active`)."""
        self._write(self._path("jobs", record.id, ".json"), record.model_dump_json().encode())
        marker = self._path("active", record.id)
        if record.status in ("queued", "in_progress"):
            if not self.fs.exists(marker):
                self._write(marker, b"")
        else:
            try:
                self.fs.rm(marker)
            except FileNotFoundError:
                pass

    def active(self) -> list[str]:
        """Ids of unfinished jobs, oldest first, without reading every record."""
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/active", detail=False))

    def exists(self, job_id: str) -> bool:
        """Whether the job's record is there (one existence check: no read, no parse)."""
        return bool(self.fs.exists(self._path("jobs", job_id, ".json")))

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

    # Every file a job can have: (folder, suffix). Deleting a job removes them all.
    FILES = (
        ("jobs", ".json"),
        ("videos", ".mp4"),
        ("videos", ".png"),
        ("videos", ".thumbnail.webp"),
        ("videos", ".spritesheet.jpg"),
        ("progress", ".json"),
        ("latents", ".safetensors"),
        ("references", ""),
        ("active", ""),
    )
    # `variant` of `GET /v1/videos/{id}/content` -> (suffix, media type); "video" is the clip.
    VARIANTS = {
        "thumbnail": (".thumbnail.webp", "image/webp"),
        "spritesheet": (".spritesheet.jpg", "image/jpeg"),
    }

    def delete(self, job_id: str) -> bool:
        """Remove every file of the job; True if its record was there."""
        found = False
        for kind, suffix in self.FILES:
            path = self._path(kind, job_id, suffix)
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                continue
            found = found or kind == "jobs"
        return found

    def delete_progress(self, job_id: str) -> None:
        try:
            self.fs.rm(self._path("progress", job_id, ".json"))
        except FileNotFoundError:
            pass

    def put_video(
        self, job_id: str, data: bytes, suffix: str, variants: dict[str, bytes] | None = None
    ) -> None:
        """The clip (`suffix` .mp4, or .png for one frame) and its preview images by variant name."""
        for name, image in (variants or {}).items():
            self._write(self._path("videos", job_id, self.VARIANTS[name][0]), image)
        self._write(self._path("videos", job_id, suffix), data)

    def get_video(self, job_id: str, variant: str = "video") -> tuple[bytes, str] | None:
        """(bytes, media type) of the clip or of a variant; None if there is none."""
        choices = (
            [self.VARIANTS[variant]] if variant != "video" else [(".mp4", "video/mp4"), (".png", "image/png")]
        )
        for suffix, media in choices:
            try:
                with self.fs.open(self._path("videos", job_id, suffix), "rb") as f:
                    return f.read(), media
            except FileNotFoundError:
                continue
        return None

    def put_latents(self, job_id: str, data: bytes) -> None:
        """A job's denoised latents that could not be decoded (see kinoray.models.latents)."""
        self._write(self._path("latents", job_id, ".safetensors"), data)

    def has_latents(self, job_id: str) -> bool:
        return bool(self.fs.exists(self._path("latents", job_id, ".safetensors")))

    def put_reference(self, job_id: str, data: bytes) -> str:
        """A job's reference image file (`input_reference`), as sent; returns the URL the encode
        stage reads it from (any replica: it is in the store)."""
        path = self._path("references", job_id)
        self._write(path, data)
        return str(self.fs.unstrip_protocol(path))  # absolute: replicas run in other folders

    def copy_reference(self, source_id: str, job_id: str) -> str:
        """Job `source_id`'s reference image as job `job_id`'s too; returns its URL."""
        with self.fs.open(self._path("references", source_id), "rb") as f:
            return self.put_reference(job_id, f.read())

    def delete_reference(self, job_id: str) -> None:
        try:
            self.fs.rm(self._path("references", job_id))
        except FileNotFoundError:
            pass

    def put_image(self, image_id: str, data: bytes, suffix: str = "png") -> None:
        self._write(self._path("images", image_id, f".{suffix}"), data)

    def get_image(self, image_id: str, suffix: str = "png") -> bytes | None:
        try:
            with self.fs.open(self._path("images", image_id, f".{suffix}"), "rb") as f:
                return f.read()
        except (KeyError, FileNotFoundError):
            return None

    def delete_image(self, image_id: str, suffix: str) -> None:
        try:
            self.fs.rm(self._path("images", image_id, f".{suffix}"))
        except FileNotFoundError:
            pass

    def images(self) -> list[tuple[str, str]]:
        """(id, suffix) of every stored image, oldest first."""
        names = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/images", detail=False))
        return [tuple(n.rsplit(".", 1)) for n in names if "." in n]

    # -- ingress replicas' leases: a job whose owner's lease is stale belongs to nobody ----------

    def renew_lease(self, owner: str) -> None:
        self._write(f"{self.root}/owners/{owner}.json", json.dumps({"renewed_at": time.time()}).encode())

    def drop_lease(self, owner: str) -> None:
        try:
            self.fs.rm(f"{self.root}/owners/{owner}.json")
        except FileNotFoundError:
            pass

    def lease_age(self, owner: str) -> float | None:
        """Seconds since `owner` last renewed its lease; None if it has none."""
        try:
            with self.fs.open(f"{self.root}/owners/{owner}.json", "rb") as f:
                return time.time() - float(json.loads(f.read())["renewed_at"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    # -- the webhook outbox -------------------------------------------------------------------

    def put_outbox(self, name: str, entry: dict[str, Any]) -> None:
        self._write(f"{self.root}/outbox/{name}.json", json.dumps(entry).encode())

    def delete_outbox(self, name: str) -> None:
        try:
            self.fs.rm(f"{self.root}/outbox/{name}.json")
        except FileNotFoundError:
            pass

    def outbox(self) -> list[tuple[str, dict[str, Any]]]:
        entries = []
        for path in sorted(self.fs.glob(f"{self.root}/outbox/*.json")):
            try:
                with self.fs.open(path, "rb") as f:
                    entries.append((path.rsplit("/", 1)[-1].removesuffix(".json"), json.loads(f.read())))
            except (FileNotFoundError, ValueError):
                continue
        return entries

    def set_progress(self, job_id: str, percent: int) -> None:
        self._write(self._path("progress", job_id, ".json"), json.dumps({"progress": percent}).encode())

    def get_progress(self, job_id: str) -> int | None:
        try:
            with self.fs.open(self._path("progress", job_id, ".json"), "rb") as f:
                return int(json.loads(f.read())["progress"])
        except (FileNotFoundError, ValueError, KeyError):
            return None
