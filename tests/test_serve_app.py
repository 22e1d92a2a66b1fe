"""The Serve application driven over HTTP by the official openai client and by raw requests."""

import threading
import time

import openai
import pytest
import requests
from helpers import same_video
from hypothesis import HealthCheck, settings

from kinoray.models.config import KinorayConfig
from kinoray.models.local import LocalPipeline
from kinoray.models.video import probe_video

pytestmark = pytest.mark.integration

KEY = "sk-kinoray-test"


# Three apps of four replicas each: logical CPUs for all of them (the tiny model needs little).
RAY_INIT = {"num_cpus": 16}


@pytest.fixture(scope="module")
def server(serve_base, tmp_path_factory):
    from ray import serve

    from kinoray.deployments.app import build

    store = tmp_path_factory.mktemp("store")
    main = KinorayConfig.model_validate(
        {
            "serve": {"storage": str(store / "main"), "api_keys": [KEY]},
            "denoiser": {"batch_size": 4, "batch_wait_timeout_s": 0.2},
        }
    )
    # A second app with a one-job backlog and a short deadline, for overload and failure.
    small = KinorayConfig.model_validate(
        {"serve": {"storage": str(store / "small"), "max_queued_requests": 1, "job_deadline_s": 3}}
    )
    # A third with tight limits, for schemathesis: whatever it sends stays cheap to generate.
    fuzz = KinorayConfig.model_validate(
        {
            "serve": {"storage": str(store / "fuzz"), "max_queued_requests": 4},
            "limits": {"max_size": 64, "max_frames": 9, "max_steps": 4},
        }
    )
    serve.run(build(main), name="kinoray", route_prefix="/")
    serve.run(build(small), name="small", route_prefix="/small")
    serve.run(build(fuzz), name="fuzz", route_prefix="/fuzz")
    return serve_base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local():
    return LocalPipeline(KinorayConfig())


def wait(client, video_id, timeout=120):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = client.videos.retrieve(video_id)
        seen.append((v.status, v.progress))
        if v.status in ("completed", "failed"):
            return v, seen
        time.sleep(0.05)
    raise AssertionError(f"{video_id} not done: {seen[-3:]}")


def assert_same_video(data, local, **fields):
    assert same_video(data, local, **fields)


def test_openai_client_create_poll_download(client, local):
    v = client.videos.create(
        prompt="a lighthouse in a storm",
        model="tiny-wan",
        seconds="2",
        size="48x32",
        extra_body={"seed": 42, "negative_prompt": "blurry", "num_inference_steps": 12},
    )
    assert v.status == "queued" and v.object == "video" and v.progress == 0
    assert v.size == "48x32" and v.model == "tiny-wan"
    # `seconds` is echoed as sent; the exact length (17 frames at 8 fps) is in `duration_s`.
    assert v.seconds == "2" and v.model_extra["duration_s"] == 2.125
    done, seen = wait(client, v.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    progress = [p for _, p in seen]
    assert progress == sorted(progress)  # never goes backwards
    data = client.videos.download_content(v.id).content
    # 2 s at 8 fps: 16 frames, snapped to what the VAE takes (1 + 4k) -> 17.
    assert probe_video(data) | {} == {
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "width": 48,
        "height": 32,
        "frames": 17,
        "fps": 8.0,
    }
    assert_same_video(
        data,
        local,
        prompt="a lighthouse in a storm",
        negative_prompt="blurry",
        height=32,
        width=48,
        num_frames=17,
        num_inference_steps=12,
        seed=42,
    )


def test_progress_moves_with_the_denoising_steps(client):
    # Long enough (seconds) for several progress writes, which are at most one per 0.25 s.
    v = client.videos.create(
        prompt="slow one", size="128x128", extra_body={"num_inference_steps": 60, "seed": 1}
    )
    done, seen = wait(client, v.id)
    assert done.status == "completed"
    middle = {p for s, p in seen if s == "in_progress" and 0 < p < 100}
    assert len(middle) >= 2, seen


def test_list_paginates_and_delete_removes(client):
    ids = [client.videos.create(prompt=f"list me {i}", extra_body={"seed": i}).id for i in range(3)]
    for i in ids:
        wait(client, i)
    page = client.videos.list(limit=2, order="desc")
    assert len(page.data) == 2 and page.has_more
    newest = [v.id for v in page.data]
    assert newest == ids[::-1][:2]
    rest = client.videos.list(limit=2, after=newest[-1], order="desc")
    assert rest.data[0].id == ids[0]
    deleted = client.videos.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(ids[0])


def test_eight_concurrent_requests_of_mixed_shapes(client, local, server):
    from ray import serve

    shapes = [("64x64", 9), ("48x32", 5), ("32x48", 13), ("64x64", 9)] * 2
    results = {}

    def one(i):
        size, frames = shapes[i]
        v = client.videos.create(
            prompt=f"concurrent {i}", size=size, extra_body={"seed": i, "num_frames": frames}
        )
        results[i] = wait(client, v.id)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))
    for i, v in results.items():
        assert v.status == "completed", v.error
        size, frames = shapes[i]
        w, h = (int(x) for x in size.split("x"))
        data = client.videos.download_content(v.id).content
        assert_same_video(data, local, prompt=f"concurrent {i}", height=h, width=w, num_frames=frames, seed=i)
    sizes = serve.get_deployment_handle("denoiser", "kinoray").get_batch_sizes.remote().result()
    assert max(sizes) > 1, sizes


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [
        "tiny-wan",
        *("sora-2", "sora-2-pro", "gpt-image-1", "gpt-image-1-mini", "dall-e-3", "dall-e-2"),
    ]
    assert requests.get(f"{server}/healthz").json()["status"] == "ok"
    doc = requests.get(f"{server}/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content"} <= set(doc["paths"])


def error_of(resp):
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "x", "size": "100x64"}, "size", "multiple of 16"),
        ({"prompt": "x", "size": "1280x720"}, "size", "between 16 and 128"),
        ({"prompt": "x", "seconds": "40"}, "seconds", "between 0.625 and 4"),
        ({"prompt": "x", "size": "huge"}, "size", "832x480"),
        ({"prompt": "x", "seconds": "-1"}, "seconds", "greater than 0"),
        ({"prompt": "x", "seed": "abc"}, "seed", "integer"),
        ({"prompt": "x", "num_inference_steps": 10000}, "num_inference_steps", "between"),
        ({"prompt": "x", "num_frames": 8}, "num_frames", "1 + a multiple of 4"),
        ({"prompt": "x", "colour": "red"}, "colour", "Extra inputs"),
        ({"size": "64x64"}, "prompt", "required"),
        ({"prompt": "x", "model": "gpt-4"}, "model", "not served"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, body, param, words):
    resp = requests.post(f"{server}/v1/videos", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code in (400, 404)
    err = error_of(resp)
    assert err["param"] == param and words in err["message"]


def test_bad_bodies(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    resp = requests.post(
        f"{server}/v1/videos", data=b"{not json", headers={**auth, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"
    resp = requests.post(
        f"{server}/v1/videos", data=b"prompt", headers={**auth, "Content-Type": "text/plain"}
    )
    assert resp.status_code == 415 and error_of(resp)["code"] == "unsupported_media_type"
    resp = requests.post(
        f"{server}/v1/videos", data=b"\xff\xfe", headers={**auth, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    # Over the body limit of a create: 1 MiB plus a reference image's base64 (20 MiB of image).
    huge = b'{"prompt": "' + b"x" * (29 << 20) + b'"}'
    resp = requests.post(
        f"{server}/v1/videos", data=huge, headers={**auth, "Content-Type": "application/json"}
    )
    assert resp.status_code == 413 and error_of(resp)["code"] == "request_too_large"


def test_unknown_and_hostile_ids_are_404(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for vid in ("video_doesnotexist", "..%2F..%2Fetc%2Fpasswd", "%2E%2E", "a" * 300):
        for path in (f"/v1/videos/{vid}", f"/v1/videos/{vid}/content"):
            resp = requests.get(f"{server}{path}", headers=auth)
            assert resp.status_code == 404, (path, resp.text)
            error_of(resp)


def test_auth(server):
    for headers, words in (({}, "missing bearer"), ({"Authorization": "Bearer wrong"}, "incorrect API key")):
        resp = requests.get(f"{server}/v1/videos", headers=headers)
        assert resp.status_code == 401
        err = error_of(resp)
        assert err["code"] == "invalid_api_key" and words in err["message"]
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.videos.list()
    assert requests.get(f"{server}/healthz").status_code == 200  # probes need no key


def test_full_queue_is_429_with_retry_after_and_accepted_jobs_finish(server):
    small = openai.OpenAI(base_url=f"{server}/small/v1", api_key="none", max_retries=0)
    accepted, rejected = [], []
    for i in range(4):
        try:
            accepted.append(small.videos.create(prompt=f"burst {i}", extra_body={"seed": i}).id)
        except openai.RateLimitError as exc:
            rejected.append(exc)
    assert accepted and rejected
    resp = rejected[0].response
    assert resp.headers["Retry-After"] == "5"
    assert error_of(resp)["code"] == "queue_full"
    # The backlog an ingress holds stays within its bound while it sheds the rest.
    assert requests.get(f"{server}/small/healthz").json()["jobs_in_flight"] <= 1
    for vid in accepted:
        assert wait(small, vid)[0].status == "completed"


def test_a_job_past_its_deadline_ends_failed_with_a_reason(server):
    small = openai.OpenAI(base_url=f"{server}/small/v1", api_key="none", max_retries=0)
    v = small.videos.create(
        prompt="too slow", size="128x128", extra_body={"num_frames": 33, "num_inference_steps": 200}
    )
    done, _ = wait(small, v.id, timeout=60)
    assert done.status == "failed"
    assert done.error.code == "deadline_exceeded" and "deadline" in done.error.message


def test_the_api_never_fails_on_what_its_own_schema_allows(server):
    """Schemathesis, from the app's own OpenAPI document: never a 5xx, always an OpenAI error body."""
    import schemathesis
    from hypothesis import given

    base = f"{server}/fuzz"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    everything = [result.ok() for result in schema.get_all_operations()]
    # HEAD mirrors GET (its answers have no body to check): fuzzed through GET.
    operations = [op for op in everything if op.method.upper() != "HEAD"]
    assert len(everything) - len(operations) == 7  # every GET route answers HEAD
    assert len(operations) == 11  # the Videos API with remix, the Images API, models and health

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=base)
            assert response.status_code < 500, (case.path, case.body, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
