"""The stage skeleton, with fake adapters and no model: grouping, chunking, pass-through of
failed rows, one failure policy for every stage, structured errors. No torch is imported."""

import subprocess
import sys

import numpy as np
import pytest

from kinoray.models.request import GenerationRequest, SamplingParams
from kinoray.models.stages import Decoder, Denoiser, RowError, Stage, TextEncoder, requests_to_batch


class FakeAdapter:
    """Stands in for a family adapter: a text's embedding is its length; latents are the seed."""

    conditioning = ("prompt_embeds",)
    image_conditioning = ()  # a text-to-video family

    def __init__(self, bad_text=None, bad_seed=None, bad_value=None):
        self.bad_text, self.bad_seed, self.bad_value = bad_text, bad_seed, bad_value
        self.calls = []

    def encode(self, texts):
        self.calls.append(("encode", len(texts)))
        if self.bad_text in texts:
            raise ValueError("tokenizer exploded")
        return {"prompt_embeds": np.array([[len(t), 0.0] for t in texts], np.float32)}

    def denoise(self, conditioning, seeds, sampling, on_step=None, cancelled=None):
        self.calls.append(("denoise", len(seeds), sampling))
        if self.bad_seed in seeds:
            raise MemoryError("out of memory")
        return np.array([np.full((2, 1, 2, 2), s, np.float32) for s in seeds])

    def decode(self, latents, tile_scale=0.0, tile_size=None):
        self.calls.append(("decode", len(latents), tile_scale))
        if (latents == self.bad_value).any():
            raise RuntimeError("vae broke")
        if len(latents) > self.max_decode_rows or (latents == self.oom_value).any() and not tile_scale:
            raise MemoryError("out of memory")
        return np.zeros((len(latents), 1, 4, 4, 3), np.uint8) + latents[:, :1, :1, :1, :1].astype(np.uint8)

    max_decode_rows = 99
    oom_value = None

    def decode_peak_bytes(self, plan, latent_shape, tile_size=None):
        return plan.rows * 1000 if not plan.tile_scale else 100

    @staticmethod
    def is_out_of_memory(exc):
        return isinstance(exc, MemoryError)

    def free_memory(self):
        pass

    def available_bytes(self):
        return None


def request(i, height=16):
    sampling = SamplingParams(
        height=height, width=16, num_frames=1, fps=1, num_inference_steps=2, guidance_scale=1.0
    )
    return GenerationRequest(id=f"r{i}", prompt=f"prompt {i}", seed=i, sampling=sampling)


def run_all(adapter, reqs, batch_size=None):
    enc = TextEncoder(adapter=adapter)
    den = Denoiser(adapter=adapter, max_batch_size=batch_size)
    dec = Decoder(adapter=adapter, max_batch_size=batch_size)
    return dec(den(enc(requests_to_batch(reqs))))


def test_all_rows_flow_through_and_per_stage_seconds_are_recorded():
    out = run_all(FakeAdapter(), [request(i) for i in range(4)])
    assert list(out["error"]) == [""] * 4
    assert [int(f[0, 0, 0, 0]) for f in out["frames"]] == [0, 1, 2, 3]
    for stage in ("encode", "denoise", "decode"):
        assert (out[f"{stage}_s"] >= 0).all()
    # Large intermediate columns are dropped once used (latents stay, empty, for failed rows).
    assert "prompt_embeds" not in out and all(x.size == 0 for x in out["latents"])


def test_rows_are_grouped_by_sampling_and_chunked():
    adapter = FakeAdapter()
    reqs = [request(0), request(1, height=32), request(2), request(3), request(4, height=32)]
    run_all(adapter, reqs, batch_size=2)
    denoise_calls = [c for c in adapter.calls if c[0] == "denoise"]
    assert sorted((n, s.height) for _, n, s in denoise_calls) == [(1, 16), (2, 16), (2, 32)]


@pytest.mark.parametrize(
    "adapter, stage, reason",
    [
        (FakeAdapter(bad_text="prompt 2"), "encode", "ValueError"),
        (FakeAdapter(bad_seed=2), "denoise", "MemoryError"),
        (FakeAdapter(bad_value=2), "decode", "RuntimeError"),
    ],
)
def test_one_bad_row_fails_alone_in_every_stage(adapter, stage, reason):
    out = run_all(adapter, [request(i) for i in range(4)], batch_size=4)
    assert [e != "" for e in out["error"]] == [False, False, True, False]
    assert (out["error_stage"][2], out["error_reason"][2]) == (stage, reason)
    assert reason in out["error"][2]
    assert [int(f[0, 0, 0, 0]) for i, f in enumerate(out["frames"]) if i != 2] == [0, 1, 3]
    assert out["frames"][2].size == 0


def test_rows_failed_upstream_pass_through_untouched():
    batch = requests_to_batch([request(0), request(1)])
    batch["error"] = np.array(["", "row 1: bad height"], dtype=object)
    batch["error_stage"] = np.array(["", "validate"], dtype=object)
    batch["error_reason"] = np.array(["", "invalid_request"], dtype=object)
    adapter = FakeAdapter()
    out = TextEncoder(adapter=adapter)(batch)
    assert adapter.calls == [("encode", 2)]  # the prompt and negative prompt of row 0 only
    assert list(out["error_reason"]) == ["", "invalid_request"]


def test_a_stage_may_return_a_row_error_in_place_of_an_output():
    class Picky(Stage):
        name = "picky"

        def output_columns(self):
            return {"y": "x doubled"}

        def compute(self, batch, rows, key, **kwargs):
            return {"y": [RowError("odd", "odd x") if batch["x"][i] % 2 else 2 * batch["x"][i] for i in rows]}

    out = Picky()({"x": np.arange(4)})
    assert list(out["y"]) == [0, 0, 4, 0]
    assert list(out["error_reason"]) == ["", "odd", "", "odd"]


def test_missing_input_columns_are_a_programming_error():
    with pytest.raises(KeyError, match="needs column"):
        TextEncoder(adapter=FakeAdapter())({"prompt": np.array(["x"], dtype=object)})


def test_the_skeleton_runs_without_torch():
    code = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_stage_base import FakeAdapter, request, run_all\n"
        "out = run_all(FakeAdapter(), [request(i) for i in range(3)])\n"
        "assert list(out['error']) == ['', '', '']\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_decode_retries_leaner_plans_on_out_of_memory_and_keeps_latents_when_all_fail():
    adapter = FakeAdapter()
    adapter.max_decode_rows = 1  # any batch of two or more runs out of memory
    adapter.oom_value = 2  # row 2's latents run out of memory unless tiled
    out = run_all(adapter, [request(i) for i in range(4)], batch_size=4)
    assert list(out["error"]) == ["", "", "", ""]
    decodes = [c for c in adapter.calls if c[0] == "decode"]
    # whole (4) and split (2, 2) run out of memory; split(1) decodes rows 0, 1, 3; row 2 needs a tile.
    assert decodes[0][1] == 4 and decodes[-1] == ("decode", 1, 1.0)
    assert all(x.size == 0 for x in out["latents"])

    adapter = FakeAdapter()
    adapter.max_decode_rows = 0  # nothing fits: every plan fails
    out = run_all(adapter, [request(i) for i in range(2)], batch_size=2)
    assert list(out["error_reason"]) == ["out_of_memory", "out_of_memory"]
    assert "latents are kept" in out["error"][0]
    assert [float(x[0, 0, 0, 0]) for x in out["latents"]] == [0.0, 1.0]  # kept for saving


def test_a_budget_starts_from_the_first_plan_that_fits():
    adapter = FakeAdapter()
    decoder = Decoder(adapter=adapter, memory_budget_gb=2500 / 2**30)  # 2500 bytes: fits 2 rows
    batch = Denoiser(adapter=adapter)(
        TextEncoder(adapter=adapter)(requests_to_batch([request(i) for i in range(4)]))
    )
    decoder(batch)
    assert [c[1] for c in adapter.calls if c[0] == "decode"] == [2, 2]
    assert decoder.plans_used == ["split", "split"]


def test_the_fault_setting_fails_chosen_calls(monkeypatch):
    monkeypatch.setenv("KINORAY_TESTING_DECODE_OOM", "every=2")
    adapter = FakeAdapter()
    decoder = Decoder(adapter=adapter, max_batch_size=1)
    batch = Denoiser(adapter=adapter)(
        TextEncoder(adapter=adapter)(requests_to_batch([request(i) for i in range(3)]))
    )
    out = decoder(batch)
    assert list(out["error"]) == ["", "", ""]
    # Calls 2 and 4 fail once each and are retried with the next plan: 5 calls for 3 rows.
    assert decoder.faults.calls == 5 and decoder.plans_used == ["whole", "tiled", "tiled"]
    monkeypatch.setenv("KINORAY_TESTING_DECODE_OOM", "ids=r1")
    out = Decoder(adapter=adapter)(
        Denoiser(adapter=adapter)(
            TextEncoder(adapter=adapter)(requests_to_batch([request(i) for i in range(3)]))
        )
    )
    assert list(out["error_reason"]) == ["", "out_of_memory", ""]


def test_a_batch_in_which_every_row_failed_joins_the_good_batches_in_ray_data():
    from ray.data._internal.arrow_ops.transform_pyarrow import concat
    from ray.data.block import BlockAccessor

    adapter = FakeAdapter(bad_value=0)
    enc, den, dec = TextEncoder(adapter=adapter), Denoiser(adapter=adapter), Decoder(adapter=adapter)
    # This decoder's first batch fails every row: it has never seen a good row's frames.
    failed = dec(den(enc(requests_to_batch([request(0)]))))
    good = dec(den(enc(requests_to_batch([request(1), request(2)]))))
    assert failed["error_stage"][0] == "decode" and failed["frames"][0].dtype == np.uint8
    blocks = [BlockAccessor.batch_to_block(b) for b in (failed, good)]
    joined = BlockAccessor.for_block(concat(blocks)).to_numpy()
    assert [f.size > 0 for f in joined["frames"]] == [False, True, True]
    assert [x.size > 0 for x in joined["latents"]] == [True, False, False]  # kept to be saved


def test_a_forced_whole_frame_plan_still_isolates_the_row_that_does_not_fit(monkeypatch):
    monkeypatch.setenv("KINORAY_TESTING_DECODE_OOM", "ids=r1")
    adapter = FakeAdapter()
    batch = Denoiser(adapter=adapter)(
        TextEncoder(adapter=adapter)(requests_to_batch([request(i) for i in range(3)]))
    )
    out = Decoder(adapter=adapter, plan="whole")(batch)
    assert list(out["error_reason"]) == ["", "out_of_memory", ""]
    assert all(not c[2] for c in adapter.calls if c[0] == "decode")  # never tiled
