"""The Videos API's job lifecycle through the official openai client and raw HTTP: cancellation
that stops compute, preview variants, remix, webhooks, expiry, and HTTP as players expect it."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import requests
from helpers import free_port, same_video
from PIL import Image

from kinoray.models.config import KinorayConfig
from kinoray.models.local import LocalPipeline

pytestmark = pytest.mark.integration

RAY_INIT = {"num_cpus": 12}
KEY = "sk-lifecycle"
SECRET = "whsec_" + base64.b64encode(b"kinoray-test-secret-0123456789ab").decode()
SLOW = {"num_inference_steps": 200, "height": 96, "width": 96, "num_frames": 17}


class Receiver:
    """A webhook receiver on 127.0.0.1 that fails the first `fail_first` deliveries of each event."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.attempts: dict[str, int] = {}  # event id -> attempts
        self.tried: list[str] = []  # video id of every attempt
        self.delivered: list[tuple[bytes, dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                event_id = self.headers.get("webhook-id", "")
                receiver.attempts[event_id] = receiver.attempts.get(event_id, 0) + 1
                receiver.tried.append(json.loads(body)["data"]["id"])
                ok = receiver.attempts[event_id] > receiver.fail_first
                if ok:
                    receiver.delivered.append((body, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(200 if ok else 503)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events_for(self, video_id):
        return [json.loads(body) for body, _ in self.delivered if json.loads(body)["data"]["id"] == video_id]


@pytest.fixture(scope="module")
def receivers():
    return {"ok": Receiver(), "flaky": Receiver(fail_first=2), "unlisted": Receiver()}


@pytest.fixture(scope="module")
def server(serve_base, tmp_path_factory, receivers):
    from ray import serve

    from kinoray.deployments.app import build

    store = tmp_path_factory.mktemp("store")
    hooks = [
        {
            "url": receivers["ok"].url,
            "secret": SECRET,
            "events": ["video.completed", "video.failed", "video.cancelled"],
        },
        {"url": receivers["flaky"].url, "secret": SECRET},
    ]
    main = KinorayConfig.model_validate(
        {
            "serve": {"storage": str(store / "main"), "api_keys": [KEY], "webhooks": hooks},
            # Jobs sent together share a denoising batch.
            "denoiser": {"batch_size": 2, "batch_wait_timeout_s": 0.5},
        }
    )
    short = KinorayConfig.model_validate(
        {
            "serve": {
                "storage": str(store / "short"),
                "retention_s": 2,
                "sweep_interval_s": 0.5,
                "on_restart": "fail",
            }
        }
    )
    serve.run(build(main), name="kinoray", route_prefix="/")
    serve.run(build(short), name="short", route_prefix="/short")
    return {"url": serve_base, "store": store / "main", "short_store": store / "short"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, webhook_secret=SECRET)


@pytest.fixture(scope="module")
def local():
    return LocalPipeline(KinorayConfig())


AUTH = {"Authorization": f"Bearer {KEY}"}


def wait(client, video_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = client.videos.retrieve(video_id)
        if v.status in ("completed", "failed"):
            return v
        time.sleep(0.05)
    raise AssertionError(f"{video_id} not done")


def files_of(store: Path, video_id: str) -> list[str]:
    return [str(p.relative_to(store)) for p in store.rglob("*") if video_id in p.name]


def denoiser_handle(app="kinoray"):
    from ray import serve

    return serve.get_deployment_handle("denoiser", app_name=app)


# -- cancellation -------------------------------------------------------------------------------


def test_delete_stops_a_job_within_two_steps_and_its_batch_mate_finishes(client, server, local):
    a = client.videos.create(prompt="a red fox", extra_body={**SLOW, "seed": 1})
    b = client.videos.create(prompt="a blue bird", extra_body={**SLOW, "seed": 2})
    while client.videos.retrieve(a.id).progress < 20:
        time.sleep(0.02)
    assert client.videos.delete(a.id).deleted
    done = wait(client, b.id)
    assert done.status == "completed"
    assert same_video(
        client.videos.download_content(b.id).read(), local, prompt="a blue bird", seed=2, **SLOW
    )
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(a.id)
    stopped = {s["id"]: s for s in denoiser_handle().get_stopped.remote().result()}
    assert a.id in stopped, stopped
    s = stopped[a.id]
    # Serve carried the DELETE's cancellation to the replica; the row stopped at the next step
    # after it arrived, far before its 200 steps.
    assert s["how"] == "request", s
    assert s["stopped_at_step"] - s["cancelled_at_step"] <= 2, s
    assert s["stopped_at_step"] < 150, s
    assert files_of(server["store"], a.id) == []
    # Finished jobs leave no progress record either.
    assert files_of(server["store"] / "progress", b.id) == []


def test_an_image_request_whose_client_leaves_stops_its_compute(server):
    body = {"prompt": "a slow image", "num_inference_steps": 200, "height": 128, "width": 128, "seed": 3}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server['url']}/v1/images/generations", json=body, headers=AUTH, timeout=1.0)
    deadline = time.time() + 30
    while time.time() < deadline:
        stopped = [s for s in denoiser_handle().get_stopped.remote().result() if s["id"].startswith("img_")]
        if stopped:
            assert stopped[0]["stopped_at_step"] < 200
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the image's compute was not stopped")
    assert list((server["store"] / "images").iterdir()) == []
    assert list((server["store"] / "progress").glob("img_*")) == []


# -- variants, remix ------------------------------------------------------------------------------


def test_thumbnail_and_spritesheet_through_the_official_client(client, server):
    v = client.videos.create(prompt="a green leaf", size="96x64", seconds="2", extra_body={"seed": 5})
    assert wait(client, v.id).status == "completed"
    thumb = Image.open(io.BytesIO(client.videos.download_content(v.id, variant="thumbnail").read()))
    sheet = Image.open(io.BytesIO(client.videos.download_content(v.id, variant="spritesheet").read()))
    # Documented: the thumbnail is the middle frame at the video's size, WebP; the spritesheet
    # is up to 16 evenly spaced frames (17 frames here -> 16 tiles, 4x4) as one JPEG.
    assert (thumb.format, thumb.size) == ("WEBP", (96, 64))
    assert (sheet.format, sheet.size) == ("JPEG", (4 * 96, 4 * 64))
    client.videos.delete(v.id)
    assert files_of(server["store"], v.id) == []


def test_remix_reuses_the_source_parameters_and_seed(client, local):
    source = client.videos.create(prompt="a red fox", size="64x64", seconds="1", extra_body={"seed": 11})
    remix = client.videos.remix(source.id, prompt="a blue fox")
    assert remix.remixed_from_video_id == source.id
    done = wait(client, remix.id)
    assert done.status == "completed" and done.prompt == "a blue fox"
    assert (done.size, done.seconds, done.model_extra["seed"]) == (source.size, source.seconds, 11)
    assert same_video(
        client.videos.download_content(remix.id).read(),
        local,
        prompt="a blue fox",
        seed=11,
        height=64,
        width=64,
        num_frames=9,
    )
    with pytest.raises(openai.NotFoundError) as info:
        client.videos.remix("video_0000000000000000nosuchvideo00", prompt="x")
    assert info.value.body["param"] == "video_id"


# -- webhooks -------------------------------------------------------------------------------------


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_webhooks_are_signed_retried_and_go_only_where_configured(client, receivers):
    v = client.videos.create(prompt="a hooked fox", extra_body={"seed": 21})
    assert wait(client, v.id).status == "completed"
    wait_for(lambda: receivers["ok"].events_for(v.id) and receivers["flaky"].events_for(v.id))
    for name in ("ok", "flaky"):
        for body, headers in receivers[name].delivered:
            client.webhooks.verify_signature(body, headers)  # raises if forged
            event = client.webhooks.unwrap(body, headers)
            assert event.type in ("video.completed", "video.failed", "video.cancelled")
    (event,) = receivers["flaky"].events_for(v.id)
    assert event["type"] == "video.completed"
    # The flaky receiver failed the first two attempts; the third delivered.
    flaky = receivers["flaky"]
    event_id = next(h["webhook-id"] for b, h in flaky.delivered if json.loads(b)["data"]["id"] == v.id)
    assert flaky.attempts[event_id] == 3
    assert receivers["unlisted"].attempts == {}


def test_a_webhook_survives_an_ingress_restart_during_its_retries(client, receivers):
    import ray

    v = client.videos.create(prompt="a fox that restarts", extra_body={"seed": 22})
    assert wait(client, v.id).status == "completed"
    flaky = receivers["flaky"]
    wait_for(lambda: v.id in flaky.tried)
    # Kill the ingress replica between the first failed attempt and the retry.
    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::kinoray#ingress")
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    wait_for(lambda: flaky.events_for(v.id), timeout=60)
    assert receivers["ok"].events_for(v.id)


def test_a_cancelled_job_sends_kinorays_own_event_to_who_asked(client, receivers):
    v = client.videos.create(prompt="a fox to cancel", extra_body={**SLOW, "seed": 23})
    client.videos.delete(v.id)
    wait_for(lambda: receivers["ok"].events_for(v.id))
    assert [e["type"] for e in receivers["ok"].events_for(v.id)] == ["video.cancelled"]
    time.sleep(1)
    assert receivers["flaky"].events_for(v.id) == []  # not among the events it asked for


# -- expiry -----------------------------------------------------------------------------------------


def test_finished_videos_expire_and_their_files_go(server):
    short = openai.OpenAI(base_url=f"{server['url']}/short/v1", api_key="none", max_retries=0)
    v = short.videos.create(prompt="a fleeting fox", extra_body={"seed": 31})
    done = wait(short, v.id)
    assert done.status == "completed"
    assert done.expires_at is not None and 0 < done.expires_at - done.completed_at <= 2
    wait_for(lambda: files_of(server["short_store"], v.id) == [], timeout=15)
    with pytest.raises(openai.NotFoundError):
        short.videos.retrieve(v.id)


def test_a_job_whose_replica_is_gone_ends_interrupted_when_so_configured(server):
    """What a server killed mid-job leaves (tests/test_serve_restart.py kills one for real and
    restarts it with `on_restart: requeue`): a running job owned by a replica with no lease."""
    from kinoray.deployments.store import JobRecord, JobStore, new_job_id

    store = JobStore(str(server["short_store"]))
    job_id = new_job_id()
    request = {"id": job_id, "prompt": "orphan", "seed": 1}
    store.put(
        JobRecord(
            id=job_id, model="tiny-wan", status="in_progress", seconds="1", size="64x64", seed=1,
            request=request, deadline_at=time.time() + 600, owner="a-replica-that-died",
        )
    )  # fmt: skip
    short = openai.OpenAI(base_url=f"{server['url']}/short/v1", api_key="none", max_retries=0)
    wait_for(lambda: short.videos.retrieve(job_id).status == "failed", timeout=15)
    assert short.videos.retrieve(job_id).error.code == "interrupted"


# -- HTTP as browsers, players and proxies use it ------------------------------------------------


@pytest.fixture(scope="module")
def finished(client):
    v = client.videos.create(prompt="a fox for players", extra_body={"seed": 41})
    assert wait(client, v.id).status == "completed"
    return v.id, client.videos.download_content(v.id).read()


def content(server, video_id, **headers):
    return requests.get(f"{server['url']}/v1/videos/{video_id}/content", headers={**AUTH, **headers})


def test_byte_ranges(server, finished):
    video_id, whole = finished
    n = len(whole)
    first = content(server, video_id, Range="bytes=0-1")
    assert (first.status_code, first.content) == (206, whole[:2])
    assert first.headers["Content-Range"] == f"bytes 0-1/{n}" and first.headers["Accept-Ranges"] == "bytes"
    middle = content(server, video_id, Range="bytes=100-199")
    assert (middle.status_code, middle.content) == (206, whole[100:200])
    tail = content(server, video_id, Range="bytes=50-")
    assert (tail.status_code, tail.content) == (206, whole[50:])
    beyond = content(server, video_id, Range=f"bytes={n}-")
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{n}"
    assert beyond.json()["error"]["param"] == "range" and beyond.headers["Accept-Ranges"] == "bytes"
    backwards = content(server, video_id, Range="bytes=5-2")  # invalid: ignored (RFC 9110)
    assert (backwards.status_code, backwards.content) == (200, whole)
    plain = content(server, video_id)
    assert (plain.status_code, plain.headers["Accept-Ranges"]) == (200, "bytes")


def test_head_wherever_get_is_served(server, finished):
    video_id, whole = finished
    for path in (f"/v1/videos/{video_id}/content", f"/v1/videos/{video_id}", "/v1/videos", "/v1/models"):
        head = requests.head(f"{server['url']}{path}", headers=AUTH)
        assert head.status_code == 200, path
        assert head.content == b""
    head = requests.head(f"{server['url']}/v1/videos/{video_id}/content", headers=AUTH)
    assert int(head.headers["Content-Length"]) == len(whole)


def test_405_says_what_is_allowed(server):
    resp = requests.put(f"{server['url']}/v1/videos", headers=AUTH)
    assert resp.status_code == 405
    assert set(resp.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_401_says_how_to_authenticate(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = requests.get(f"{server['url']}/v1/videos", headers=headers)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_compressed_body_is_415_naming_its_encoding(server):
    resp = requests.post(
        f"{server['url']}/v1/videos",
        data=b"\x1f\x8b",
        headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status_code == 415 and "gzip" in resp.json()["error"]["message"]


def test_a_text_field_sent_as_a_file_part_is_read_as_text(client, server):
    resp = requests.post(
        f"{server['url']}/v1/videos",
        files={"prompt": (None, "a purple fox"), "seconds": ("seconds.txt", b"1")},
        headers=AUTH,
    )
    assert resp.status_code == 200, resp.text
    resp = requests.post(
        f"{server['url']}/v1/videos", files={"prompt": ("p.txt", b"a purple fox")}, headers=AUTH
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompt"] == "a purple fox"
    wait(client, resp.json()["id"])


def test_the_images_api_with_openais_default_fields_and_keyed_file_urls(client, server):
    image = client.images.generate(
        prompt="a still fox",
        model="gpt-image-1",
        size="auto",
        quality="auto",
        moderation="auto",
        background="auto",
        output_format="webp",
        output_compression=80,
        response_format="url",
        extra_body={"seed": 51},
    )
    url = image.data[0].url
    assert url.endswith(".webp")
    assert requests.get(url).status_code == 401  # the file obeys the API keys
    got = requests.get(url, headers=AUTH)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).format == "WEBP"
