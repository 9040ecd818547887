"""The per-worker pipeline cache: least recently used out first, by count and by weight memory."""

import pytest

from shared.storage import FileStorage
from worker.model.pipelines import PipelineCache, pipeline_bytes


def _get(cache, name, storage):
    """A cache lookup whose miss fetches the model's files from storage, as a sample job's does."""
    return cache.get(name, lambda local: storage.download_dir(f"models/{name}", local), "cpu")


@pytest.fixture
def stored_models(tiny_pipeline_dir, tmp_path):
    storage = FileStorage(tmp_path / "objects")
    for name in ("m1", "m2", "m3"):
        storage.upload_dir(tiny_pipeline_dir, f"models/{name}")
    return storage


def test_pipeline_bytes_counts_every_weight(tiny_pipeline_dir):
    from worker.model.pipelines import load_pipeline_dir

    pipe = load_pipeline_dir(tiny_pipeline_dir)
    expected = sum(p.numel() * 4 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert expected <= pipeline_bytes(pipe) <= expected * 1.05  # + buffers (position ids)


def test_the_least_recently_used_goes_once_the_memory_budget_is_passed(stored_models, tmp_path):
    probe = PipelineCache(tmp_path / "probe")
    one = pipeline_bytes(_get(probe, "m1", stored_models))
    cache = PipelineCache(tmp_path / "cache", capacity=10, max_bytes=int(2.5 * one))
    p1 = _get(cache, "m1", stored_models)
    _get(cache, "m2", stored_models)
    assert _get(cache, "m1", stored_models) is p1  # a hit; m1 is now the most recent
    _get(cache, "m3", stored_models)  # 3 × one > 2.5 × one: m2 goes, not m1
    assert list(cache._items) == ["m1", "m3"] and cache.loads == 3 and cache.bytes == 2 * one
    # A reload reads the files kept on disk: the storage is not asked again.
    for key in stored_models.list("models/m2"):
        stored_models.delete(key)
    _get(cache, "m2", stored_models)
    assert cache.loads == 4 and list(cache._items) == ["m3", "m2"]


def test_the_count_cap_holds_and_one_pipeline_always_stays(stored_models, tmp_path):
    cache = PipelineCache(tmp_path / "cache", capacity=1, max_bytes=1)  # smaller than any pipeline
    _get(cache, "m1", stored_models)
    _get(cache, "m2", stored_models)
    assert list(cache._items) == ["m2"]


def _writer(tag: str):
    def fetch(d):
        (d / "unet").mkdir(parents=True, exist_ok=True)
        (d / "unet" / "w.bin").write_text(tag)
        (d / "model_index.json").write_text("{}")
    return fetch


def test_a_cached_copy_is_never_replaced_under_a_worker_that_loads_it(tmp_path):
    """Two workers on one machine fetch the same model at once (a spread job's pieces): the one that
    finishes first loads its copy while the other's fetch is still running; the later one must not
    replace (delete) that copy, and leaves no temporary folder behind."""
    from worker.model.pipelines import fetch_dir_once

    local = tmp_path / "cache" / "m1"
    seen = {}

    def slow_fetch(d):  # B's fetch: A fetches and starts loading before B's files are in place
        _writer("B")(d)
        seen["a"] = fetch_dir_once(local, _writer("A"), "model_index.json")
        seen["a_file"] = (seen["a"] / "unet" / "w.bin").open()  # A is reading its weights

    got = fetch_dir_once(local, slow_fetch, "model_index.json")
    assert got == seen["a"] == local
    assert (local / "unet" / "w.bin").read_text() == "A"  # the copy A loads stayed in place
    assert seen["a_file"].read() == "A"
    seen["a_file"].close()
    assert sorted(p.name for p in local.parent.iterdir()) == ["m1"]  # B's temporary copy is gone


def test_a_half_fetched_folder_is_replaced_and_a_whole_one_reused(tmp_path):
    from worker.model.pipelines import fetch_dir_once

    local = tmp_path / "m2"
    (local / "unet").mkdir(parents=True)  # a fetch that died before writing its marker
    assert fetch_dir_once(local, _writer("new"), "model_index.json") == local
    assert (local / "unet" / "w.bin").read_text() == "new"

    def must_not_fetch(_d):
        raise AssertionError("a whole copy is fetched again")

    assert fetch_dir_once(local, must_not_fetch, "model_index.json") == local
