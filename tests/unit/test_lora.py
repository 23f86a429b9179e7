"""Reading PEFT LoRA adapters: what is served, and what is refused with a message naming it."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from model_svc.__main__ import check_adapters, parse_args
from model_svc.engine import lora
from tests.helpers import MODEL

CONFIG = AutoConfig.from_pretrained(MODEL)  # hidden 576, 9 heads of 64, 3 KV heads, MLP 1536, 30 layers


def write(folder, config=None, tensors=None, rank=4):
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                "bias": "none", **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    prefix = "base_model.model.model.layers.0.self_attn"
    weights = tensors if tensors is not None else {
        f"{prefix}.q_proj.lora_A.weight": torch.randn(rank, 576),
        f"{prefix}.q_proj.lora_B.weight": torch.randn(576, rank),
        f"{prefix}.v_proj.lora_A.weight": torch.randn(rank, 576),
        f"{prefix}.v_proj.lora_B.weight": torch.randn(192, rank)}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_an_adapter_is_read_with_its_rank_scaling_and_modules(tmp_path):
    adapter = lora.load("x", write(tmp_path / "x"), CONFIG)
    assert (adapter.rank, adapter.scaling, adapter.modules) == (4, 2.0, ("q_proj", "v_proj"))
    assert set(adapter.pairs) == {(0, "q_proj"), (0, "v_proj")}
    assert adapter.pairs[(0, "v_proj")].b.shape == (192, 4) and adapter.pairs[(0, "v_proj")].b.dtype == torch.float32
    rs = lora.load("y", write(tmp_path / "y", {"use_rslora": True}), CONFIG)
    assert rs.scaling == 8 / 2  # alpha / sqrt(r)


@pytest.mark.parametrize("config,tensors,message", [
    ({"use_dora": True}, None, "use_dora=True is not served"),
    ({"bias": "all"}, None, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"r": 128}, None, "r=128 is not served: must be in [1, 64]"),
    ({"peft_type": "IA3"}, None, "peft_type='IA3'"),
    ({}, {"base_model.model.lm_head.lora_A.weight": torch.randn(4, 576)}, "not a LoRA pair of a decoder projection"),
    ({}, {"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.randn(4, 576)},
     "target module 'rotary' is not served"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 576)}, "without its pair"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 1024),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(1024, 4)},
     "an adapter of another model"),
    ({}, {"base_model.model.model.layers.40.self_attn.q_proj.lora_A.weight": torch.randn(4, 576),
          "base_model.model.model.layers.40.self_attn.q_proj.lora_B.weight": torch.randn(576, 4)},
     "layer 40 is not among the model's 30"),
])
def test_what_is_refused(tmp_path, config, tensors, message):
    with pytest.raises(lora.AdapterError) as info:
        lora.load("bad", write(tmp_path / "bad", config, tensors), CONFIG)
    assert message in str(info.value) and "adapter bad" in str(info.value)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(lora.AdapterError, match="cannot read"):
        lora.load("gone", str(tmp_path / "nowhere"), CONFIG)


@pytest.mark.parametrize("argv,message", [
    (["--lora", "nameonly"], "expected NAME=PATH"),
    (["--lora", "bad name=/x"], "a name has 1 to 64"),
    (["--lora", "a=/x", "--lora", "a=/y"], "the name 'a' is given twice"),
    (["--max-lora-rank", "0"], "--max-lora-rank=0 is invalid"),
])
def test_lora_flags_are_checked_before_the_weights_load(argv, message):
    with pytest.raises(SystemExit) as info:
        check_adapters(parse_args(argv))
    assert message in str(info.value)


def test_lora_reads_comma_separated_adapters_from_the_environment(monkeypatch):
    monkeypatch.setenv("GENRPC_LORA", "a=/x,b=/y")
    assert check_adapters(parse_args([])) == [("a", "/x"), ("b", "/y")]
    assert check_adapters(parse_args(["--lora", "c=/z"])) == [("a", "/x"), ("b", "/y"), ("c", "/z")]


def test_the_native_kernel_is_row_independent_and_accurate():
    """kernels/lora.c: a row's update depends on that row alone (any batch, any order, any neighbours'
    adapters), and it is the float64 update rounded as documented (out + bf16(scale * B A x), within
    one bfloat16 step, A x rounded to bfloat16 as documented); a module an adapter does not target
    leaves its rows as they are."""
    kernel = lora.load_kernel()
    if kernel is None:
        pytest.skip("no C compiler here: the LoRA kernel cannot be built (PEFT's arithmetic runs instead)")
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(r, 576, generator=generator) for r in (16, 24)]  # two adapters, ranks 16 and 24
    b = [torch.randn(192, r, generator=generator) * 0.05 for r in (16, 24)]
    q, k = lora.Packed([(a[0], b[0]), (a[1], b[1])]), lora.Packed([None, (a[1], b[1][:130])])
    x = torch.randn(12, 576, generator=generator).to(torch.bfloat16)
    base = [torch.randn(12, 192, generator=generator).to(torch.bfloat16), torch.randn(12, 130).to(torch.bfloat16)]

    def rows(index, slot):
        index = torch.tensor(index, dtype=torch.int64)
        return (index, torch.full_like(index, slot), torch.full((len(index),), (2.0, 0.5)[slot]))

    def run(*calls):
        outs = [o.clone() for o in base]
        for index, slot in calls:
            kernel.apply(x, rows(index, slot), [(q, outs[0]), (k, outs[1])])
        return outs

    alone, batched = run(([3], 0)), run(([11, 3, 0, 7], 0), ([1, 2], 1))
    assert torch.equal(alone[0][3], batched[0][3]) and torch.equal(batched[0][5], base[0][5])  # untouched rows
    assert torch.equal(alone[1], base[1]) and not torch.equal(batched[1][1], base[1][1])  # k: adapter 1 only
    u = (x[3].double() @ a[0].T.to(torch.bfloat16).double()).to(torch.bfloat16)  # the shrink's, rounded
    update = u.double() @ b[0].T.to(torch.bfloat16).double() * 2.0
    expected = (base[0][3].double() + update.to(torch.bfloat16).double()).to(torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps * expected.double().abs().clamp(min=1.0)
    assert ((alone[0][3].double() - expected.double()).abs() <= step).all()


@pytest.mark.parametrize("flags", [("-march=x86-64", "-mtune=generic"), ("-mno-avx512f",), ("-mno-avx512bf16",)],
                         ids=["baseline-x86-64", "avx2", "avx512-without-bf16"])
def test_the_kernel_gives_the_same_bits_built_for_this_cpu_and_for_others(flags):
    """kernels/lora.c as built here (-march=native: VDPBF16PS, AVX-512 or AVX2 fused multiply-adds)
    against a build for baseline x86-64 (fmaf one element at a time), one without AVX-512 and one
    without AVX-512 BF16: the same chains, so the same bits, for ranks, widths and depths that are
    not multiples of 16 (or of the 64-column blocks; odd too), rows of several adapters interleaved,
    and each row alone."""
    import ctypes

    from model_svc.engine import kernels

    kernel = lora.load_kernel()
    if kernel is None:
        pytest.skip("no C compiler here: the LoRA kernel cannot be built (PEFT's arithmetic runs instead)")
    try:
        path = kernels.build(lora.SOURCE, extra_flags=("-fopenmp", *flags))
        other = lora.Kernel(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"no {' '.join(flags)} build here: {exc}")
    generator = torch.Generator().manual_seed(4)
    for k, n, ranks in ((576, 192, (16, 24)), (1536, 576, (16, 64, 7)), (101, 35, (3, 16, 17)), (64, 200, (1, 2))):
        pairs = [(torch.randn(r, k, generator=generator), torch.randn(n, r, generator=generator) * 0.05)
                 for r in ranks]
        packed = lora.Packed(pairs)
        x = torch.randn(20, k, generator=generator).to(torch.bfloat16)
        base = torch.randn(20, n, generator=generator).to(torch.bfloat16)
        which = torch.randint(0, len(ranks), (14,), generator=generator).sort().values  # runs of one adapter
        index = torch.randperm(20, generator=generator)[:14]
        rows = (index, which.to(torch.int64), torch.tensor([(0.5, 2.0, 1.0)[i] for i in which]))
        outs = {}
        for name, build in (("native", kernel), ("other", other)):
            outs[name] = base.clone()
            build.apply(x, rows, [(packed, outs[name])])
            alone = base.clone()
            build.apply(x, tuple(t[6:7] for t in rows), [(packed, alone)])
            assert torch.equal(alone[index[6]], outs[name][index[6]]), (name, k, n)
        assert torch.equal(outs["native"], outs["other"]), (k, n, ranks)
        assert not torch.equal(outs["native"], base)
