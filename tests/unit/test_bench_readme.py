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
