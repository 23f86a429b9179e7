"""bench/README.md is written by bench/readme.py from the JSON in bench/results, never by hand."""

import json

from bench import readme


def test_the_committed_bench_readme_is_what_its_results_make():
    with open(readme.README) as f:
        committed = f.read()
    assert committed == readme.render(), "bench/README.md differs from its results: run python -m bench.readme"


def test_each_section_shows_its_latest_results_and_the_cpu_they_ran_on(tmp_path, monkeypatch):
    monkeypatch.setattr(readme, "RESULTS", str(tmp_path))
    report = {"cpu": "Some CPU (avx2), 2 cores", "when": "2026-12-03 10:00", "prompts": 4, "tokens": 24,
              "accuracy_against_float32": {"library generate()": {"mean_agreement": 3.5, "first_token_equal": 3}},
              "one_sequence_tok_s": {"none": 40.0, "int8": 42.0, "nf4": 44.0}, "speed_ratio_int8": 1.05,
              "speed_ratio_nf4": 1.1}
    (tmp_path / "output_layer-avx2.json").write_text(json.dumps(report))
    text = readme.render()
    section = text[text.index("## A quantized output layer (AVX2 build)"):]
    assert "Latest run: 2026-12-03 10:00, on Some CPU (avx2), 2 cores." in section
    assert "| library generate() | 3.5 | 3 of 4 |" in section
    assert "int8 42.0 tok/s (1.05x)" in section and "nf4 44.0 tok/s (1.10x)" in section
    # the others have no results here: each says so instead of showing stale figures
    assert text.count("No result recorded yet") == len(readme.SECTIONS) - 1


def test_a_report_without_a_cpu_model_says_so():
    assert readme.machine({"machine": {"cpus": 2, "platform": "Linux-x86_64"}}) == (
        "CPU model not recorded by this run (2 cores, Linux-x86_64)")
    assert readme.machine({"machine": {"cpu": "AMD EPYC (avx2), 2 cores"}}) == "AMD EPYC (avx2), 2 cores"


def test_the_peers_section_shows_the_larger_models_streams_when_they_ran():
    from bench import peers

    def point(n, genrpc, vllm):
        side = lambda t: {"tokens_per_s": t, "ttft_p50_s": 0.5, "rounds": []}  # noqa: E731
        return {"concurrency": n, "genrpc": side(genrpc), "vllm": side(vllm), "ratio_tokens_per_s": genrpc / vllm,
                "ratio_per_round": [genrpc / vllm], "ttft_ratio": 1.0}

    report = {"points": [point(8, 200.0, 100.0)], "orders": [["genrpc", "vllm"]],
              "vllm": {"version": "0.32.0", "dtype": "bfloat16"}}
    assert "1B-class" not in peers.markdown(report)
    report["large_model"] = {"model": "Llama-1B-random", "points": [point(8, 30.0, 20.0), point(32, 45.0, 60.0)]}
    text = peers.markdown(report)
    large = text[text.index("The 1B-class model (Llama-1B-random"):]
    assert "| 8 | 30.0 | 20.0 | 1.50x (1.50) |" in large and "| 32 | 45.0 | 60.0 | 0.75x (0.75) |" in large
    assert ">= 1.5x on a CPU with AMX" in large
