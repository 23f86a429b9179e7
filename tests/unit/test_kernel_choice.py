"""The native kernel's row-count choice: both ways through a column block give the same bits at every
row count (so the choice cannot make a row depend on its neighbours), the threshold is read from the
timings, and the cache of choices is reused for the same CPU, kernel and shapes only, ignored when
corrupt, and bypassed when forced."""

import json

import pytest
import torch

from model_svc.engine import gemm, kernel_choice

ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33)
SHAPES = [(64, 128, 64, 3), (96, 256, 64, 1)]  # (n, k, blocksize, layers)
DENSE = [(160, 96, 0, 1)]
INT8 = [(128, 192, 64, 1)]


@pytest.fixture(scope="module")
def kernel():
    kernel = gemm.load()
    if kernel is None:
        pytest.skip("no C compiler, or neither AVX-512 BF16 nor AVX2 with FMA here: the native kernel cannot run")
    yield kernel
    for kind in range(3):
        kernel.set_direct_rows(kind, 2)


def _has_choice(kernel) -> bool:
    return kernel.set_direct_rows(0, 2) >= 0


def test_direct_and_panel_give_the_same_bits_at_every_row_count(kernel):
    if not _has_choice(kernel):
        pytest.skip(f"the {kernel.isa} build has one way through a block: nothing to choose")
    gen = torch.Generator().manual_seed(3)
    n, k, blocksize = 96, 320, 64
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(k // blocksize, n, generator=gen).to(torch.bfloat16)
    values = torch.randn(16, generator=gen).to(torch.bfloat16)
    weight = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    dense = kernel.pack(weight)
    int8 = gemm.quantize_int8(weight, blocksize)
    x = torch.randn(max(ROWS), k, generator=gen).to(torch.bfloat16)
    outs = {}
    for rows in (0, 1, 2, 8, 4096):  # always the panel, ..., always direct
        for kind in range(3):
            kernel.set_direct_rows(kind, rows)
        outs[rows] = [(kernel.nf4(x[:m], codes, absmax, values, n, blocksize), kernel.dense(x[:m], dense),
                       kernel.int8(x[:m], *int8) if kernel.has_int8 else None) for m in ROWS]
    for rows, got in outs.items():
        for m, (nf4, dense_out, int8_out), (nf4_ref, dense_ref, int8_ref) in zip(ROWS, got, outs[0]):
            assert torch.equal(nf4, nf4_ref), f"nf4, {m} rows, direct up to {rows}"
            assert torch.equal(dense_out, dense_ref), f"bfloat16, {m} rows, direct up to {rows}"
            assert torch.equal(nf4, outs[0][-1][0][:m])  # and a row's result is the same in any batch
            if kernel.has_int8:
                assert torch.equal(int8_out, int8_ref), f"int8, {m} rows, direct up to {rows}"
                assert torch.equal(int8_out, outs[0][-1][2][:m])


def test_threshold_is_the_last_count_where_direct_wins_throughout():
    panel = {1: 10, 2: 10, 4: 10, 8: 10, 16: 10}
    assert kernel_choice._threshold({1: 5, 2: 6, 4: 9, 8: 11, 16: 9}, panel) == 4  # 16 wins again: not trusted
    assert kernel_choice._threshold({1: 5, 2: 6, 4: 9, 8: 10, 16: 10}, panel) == 16  # ties go direct
    assert kernel_choice._threshold({1: 12, 2: 6, 4: 6, 8: 6, 16: 6}, panel) == 0


def test_choices_are_measured_once_then_cached_per_cpu_kernel_and_shapes(kernel, tmp_path, monkeypatch):
    if not _has_choice(kernel):
        pytest.skip(f"the {kernel.isa} build has one way through a block: nothing to choose")
    path = tmp_path / "choices.json"
    calls = []
    real = kernel_choice.measure

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_choice, "measure", counted)
    int8 = INT8 if kernel.has_int8 else []
    first = kernel_choice.choose(kernel, SHAPES, DENSE, int8, path=path)
    assert first.source == "measured" and calls == ["nf4", "dense", "int8"][:3 if int8 else 2]
    timings = first.timings["nf4"]
    assert set(timings) == set(kernel_choice.ROWS) and all(d > 0 and p > 0 for d, p in timings.values())
    expected = kernel_choice._threshold({m: v[0] for m, v in timings.items()}, {m: v[1] for m, v in timings.items()})
    assert first.nf4_direct_rows == expected

    if int8:
        assert first.int8_direct_rows == kernel_choice._threshold(*(
            {m: v[i] for m, v in first.timings["int8"].items()} for i in (0, 1)))
    measured = len(calls)
    again = kernel_choice.choose(kernel, SHAPES, DENSE, int8, path=path)
    assert again.source == "cached" and len(calls) == measured
    assert again.describe() == first.describe().replace("measured", "cached")

    kernel_choice.choose(kernel, SHAPES[:1], DENSE, path=path)  # other shapes: measured again
    assert len(calls) == measured + 2
    real_info = kernel_choice._cpuinfo
    monkeypatch.setattr(kernel_choice, "_cpuinfo", lambda: ("Another CPU", real_info()[1]))
    assert kernel_choice.choose(kernel, SHAPES, DENSE, int8, path=path).source == "measured"  # a new CPU
    assert len(json.loads(path.read_text())) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(kernel, tmp_path, content):
    if not _has_choice(kernel):
        pytest.skip(f"the {kernel.isa} build has one way through a block: nothing to choose")
    path = tmp_path / "choices.json"
    path.write_text(content)
    assert kernel_choice.choose(kernel, SHAPES, DENSE, path=path).source == "measured"
    assert kernel_choice.choose(kernel, SHAPES, DENSE, path=path).source == "cached"


def test_a_cached_entry_with_bad_values_is_measured_again(kernel, tmp_path):
    if not _has_choice(kernel):
        pytest.skip(f"the {kernel.isa} build has one way through a block: nothing to choose")
    path = tmp_path / "choices.json"
    kernel_choice.choose(kernel, SHAPES, DENSE, path=path)
    data = json.loads(path.read_text())
    for entry in data.values():
        entry["nf4_direct_rows"] = -3
    path.write_text(json.dumps(data))
    assert kernel_choice.choose(kernel, SHAPES, DENSE, path=path).source == "measured"


def test_a_forced_choice_is_set_without_measuring(kernel, tmp_path, monkeypatch):
    if not _has_choice(kernel):
        pytest.skip(f"the {kernel.isa} build has one way through a block: nothing to choose")
    monkeypatch.setattr(kernel_choice, "measure", lambda *a, **k: pytest.fail("measured a forced choice"))
    choice = kernel_choice.choose(kernel, SHAPES, DENSE, forced=5, path=tmp_path / "choices.json")
    assert (choice.nf4_direct_rows, choice.dense_direct_rows, choice.int8_direct_rows, choice.source) == \
        (5, 5, 5, "forced")
    assert not (tmp_path / "choices.json").exists()
    assert kernel.set_direct_rows(0, 2) == 2  # (the kernel held 5: set_direct_rows returns what it sets)


def test_cpu_info_names_the_cpu_and_its_best_path():
    info = kernel_choice.cpu_info()
    assert info.model and info.isa in ("amx-bf16", "avx512-bf16", "avx2", "none")
    flags = set(kernel_choice._cpuinfo()[1])
    assert set(info.flags) <= flags
    if info.isa == "amx-bf16":
        assert info.amx_permitted and {"amx_tile", "amx_bf16"} <= flags
    assert info.model in info.describe()


def test_a_cpu_name_without_a_number_gains_its_family_and_model(tmp_path):
    """VMs that call every generation "AMD EPYC" still name the CPU a figure was measured on."""
    from genrpc.launch import cpu_model_and_flags

    text = "processor\t: {}\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: {}\nflags\t\t: fma avx2\n\n"
    generic, named = tmp_path / "generic", tmp_path / "named"
    generic.write_text(text.format(0, "AMD EPYC") + text.format(1, "AMD EPYC"))
    named.write_text(text.format(0, "AMD EPYC 7R13 Processor"))
    assert cpu_model_and_flags(str(generic)) == ("AMD EPYC family 23 model 1", {"fma", "avx2"})
    assert cpu_model_and_flags(str(named))[0] == "AMD EPYC 7R13 Processor"
    assert cpu_model_and_flags(str(tmp_path / "missing")) == ("?", set())


def test_amx_permission_is_asked_only_where_it_can_be_granted():
    """On a CPU without AMX, Linux refuses the tile state (EINVAL): request_amx says so, no crash."""
    flags = kernel_choice._cpuinfo()[1]
    granted = kernel_choice.request_amx()
    if "amx_tile" not in flags:
        assert granted is False
