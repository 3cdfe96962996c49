"""scratchgpt's own int4 and int8 kernels (model/native.py, model/csrc/quantized_linear.cpp): built here (each
code path), exact where the int8 activation they make is exact, within the bound of that rounding elsewhere."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from scratchgpt.model import native
from scratchgpt.model.fbgemm import fbgemm_available
from scratchgpt.model.int4 import Int4Linear

BUILDABLE = platform.machine().lower() in ("x86_64", "amd64") and shutil.which("c++") is not None


# The code paths of the C++ file, each built with the -march that selects it; those this CPU can run.
ARCHS = {"native": None, "haswell": "avx2", "x86-64": "scalar"}
RUNNABLE = ["native"] + (["haswell"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []) \
    + ["x86-64"]


@pytest.fixture(scope="module", params=RUNNABLE)
def any_build(request):
    """Each code path (AVX512-VNNI, AVX2, plain C++) of the kernels, built for this test: a machine with
    AVX-512 would otherwise never run the AVX2 path its AVX2-only users run."""
    if not BUILDABLE:
        pytest.skip("scratchgpt's kernels are written for x86-64 and need a C++ compiler")
    module = native.build(request.param)
    want = ARCHS[request.param]
    assert want is None or module.instruction_set() == want
    return module


@pytest.fixture(scope="module")
def kernels():
    """The built module. Where a compiler exists on x86-64 it must build: a silent fallback would hide a
    broken kernel behind slower decoding."""
    if not BUILDABLE:
        pytest.skip("scratchgpt's int4 kernel is written for x86-64 and needs a C++ compiler")
    module = native.native_kernels()
    assert module is not None, native.native_unavailable()
    return module


def layer_of(n_in: int, n_out: int, group: int, *, bias: bool, seed: int) -> Int4Linear:
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    gen = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=gen)
    if bias:
        torch.nn.init.normal_(lin.bias, std=0.02, generator=gen)
    return Int4Linear.from_linear(lin, group_size=group)


def on_int8_blocks(rows: int, n: int, seed: int) -> torch.Tensor:
    """Activations the kernel's int8 quantization keeps exactly: integers with |x| <= 127, each block of 32
    columns reaching 127 (so its scale is exactly 1)."""
    x = torch.randint(-127, 128, (rows, n), generator=torch.Generator().manual_seed(seed)).float()
    x[:, ::32] = 127.0
    return x


def float_rounding(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What float32 summation order may change in x · wᵀ: 16 ulps of sum |x_k w_k| per output (rows, out),
    far below the int8 rounding the other tests bound (~1/254 of it)."""
    return 16 * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t()) + 1e-6


@pytest.mark.parametrize(("n_in", "n_out", "group", "bias"), [(128, 37, 32, True), (256, 64, 64, False),
                                                             (384, 130, 128, True), (768, 96, 32, False)])
@pytest.mark.parametrize("rows", [1, 2, 3, 40])
def test_int4_exact_where_the_int8_activation_is_exact(any_build, n_in, n_out, group, bias, rows):
    """Integer products of nibbles and bytes, then one float scaling per 8 columns: on activations the int8
    blocks hold exactly, the product is the reference's up to float rounding of the sums."""
    layer = layer_of(n_in, n_out, group, bias=bias, seed=n_in + rows)
    x = on_int8_blocks(rows, n_in, seed=rows)
    got = any_build.int4_linear(x, layer.weight, layer.weight_scale, layer.bias, group)
    assert ((got - layer.reference(x)).abs() <= float_rounding(x, layer.dequantized())).all()


@pytest.mark.parametrize(("n_in", "group"), [(128, 32), (256, 64), (512, 128)])
def test_int4_within_half_an_int8_step_of_each_activation_block(any_build, n_in, group):
    """Off the int8 grid each activation moves by at most half its block's step (max|x_b| / 254), so each
    output moves by at most sum_b step_b / 2 · sum_{k in b} |w_k|; the kernel stays inside that bound, and
    is not the reference bit for bit (the rounding really happens)."""
    layer = layer_of(n_in, 50, group, bias=True, seed=1)
    x = torch.randn(5, n_in, generator=torch.Generator().manual_seed(2))
    x[1] = 0.0  # an all-zero row: scale 0, no division by zero
    x[2, :32] *= 1e-3  # blocks of very different sizes in one row
    got = any_build.int4_linear(x, layer.weight, layer.weight_scale, layer.bias, group)
    ref = layer.reference(x)
    half_step = x.abs().view(5, -1, 32).amax(dim=-1) / 254  # (rows, blocks)
    w_abs = layer.dequantized().abs().view(50, -1, 32).sum(dim=-1)  # (out, blocks)
    bound = half_step @ w_abs.t() + 1e-5  # (rows, out)
    assert ((got - ref).abs() <= bound).all()
    assert torch.equal(got[1], ref[1])  # zero in, bias out
    assert not torch.equal(got, ref)


def test_the_layer_runs_it_in_any_float_dtype_and_falls_back_for_gradients(kernels):
    layer = layer_of(256, 48, 32, bias=True, seed=3)
    layer.use("native")
    x = on_int8_blocks(4, 256, seed=3)
    ref = layer.reference(x)
    torch.testing.assert_close(layer(x.view(2, 2, 256)).view(4, 48), ref, rtol=1e-5, atol=1e-5)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, rtol=2e-2, atol=2e-2)
    # No backward in the kernel: a forward that trains something below this layer takes an exact path.
    xg = torch.randn(3, 256, requires_grad=True)
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, layer.dequantized().sum(0).expand(3, 256), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the same tensor without gradients runs the kernel
        assert not torch.equal(layer(xg), layer.reference(xg))
    # A layer the kernel does not take (in = 96, not a multiple of 128) runs another kernel, same numbers.
    odd = layer_of(96, 10, 32, bias=False, seed=4)
    odd.use("native")
    xo = torch.randn(2, 96)
    assert (odd(xo) - odd.reference(xo)).norm() / odd.reference(xo).norm() < 0.02


def test_bad_arguments_are_refused_not_read_out_of_bounds(any_build):
    layer = layer_of(256, 8, 32, bias=False, seed=5)
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        any_build.int4_linear(torch.randn(1, 96), layer.weight[:, :48].contiguous(),
                            layer.weight_scale[:, :3].contiguous(), None, 32)
    with pytest.raises(RuntimeError, match="bytes a row"):
        any_build.int4_linear(torch.randn(1, 128), layer.weight, layer.weight_scale, None, 32)
    with pytest.raises(RuntimeError, match="scale shape"):
        any_build.int4_linear(x, layer.weight, layer.weight_scale, None, 64)
    with pytest.raises(RuntimeError, match="floating point"):
        any_build.int4_linear(x.long(), layer.weight, layer.weight_scale, None, 32)
    with pytest.raises(RuntimeError, match="bias"):
        any_build.int4_linear(x, layer.weight, layer.weight_scale, torch.zeros(7), 32)
    with pytest.raises(RuntimeError, match="uint8"):
        any_build.int4_linear(x, layer.weight.t(), layer.weight_scale, None, 32)  # not contiguous: refused
    # Any leading shape and float dtype: computed in float32, returned in x's shape and dtype.
    y = any_build.int4_linear(x, layer.weight, layer.weight_scale, None, 32)
    y3 = any_build.int4_linear(x.double().view(1, 1, 256), layer.weight, layer.weight_scale, None, 32)
    assert y3.shape == (1, 1, 8) and y3.dtype == torch.float64 and torch.equal(y3.view(1, 8).float(), y)
    assert any_build.int4_linear(torch.empty(0, 3, 256), layer.weight, layer.weight_scale, None, 32).shape == (0, 3, 8)


def test_turned_off_by_the_environment_and_says_why(monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_NATIVE", "0")
    native._loaded.cache_clear()
    try:
        assert native.native_kernels() is None
        assert "SCRATCHGPT_NATIVE=0" in native.native_unavailable()
        layer = layer_of(256, 16, 32, bias=True, seed=6)
        layer.use("native")  # asked for, not there: the layer still answers, through fbgemm or dense
        x = torch.randn(2, 256)
        assert (layer(x) - layer.reference(x)).norm() / layer.reference(x).norm() < 0.02
    finally:
        native._loaded.cache_clear()


def test_builds_per_source_and_cpu():
    """The extension's name covers its source, flags and CPU: an edited kernel, or another CPU (-march=native),
    never loads a stale library."""
    name = native._name()
    assert name.startswith("scratchgpt_kernels_") and name == native._name()
    assert native.kernel_dir().name == "kernels"


# ---- int8: per-row int8 weights (model/quantize.py's Int8Linear) ----


def int8_layer(n_in: int, n_out: int, *, bias: bool, seed: int):
    from scratchgpt.model.quantize import Int8Linear

    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    gen = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=gen)
    return Int8Linear.from_linear(lin)


@pytest.mark.parametrize(("n_in", "n_out", "bias"), [(64, 37, True), (192, 64, False), (768, 130, True)])
@pytest.mark.parametrize("rows", [1, 2, 3, 40])
def test_int8_exact_where_the_int8_activation_is_exact(any_build, n_in, n_out, bias, rows):
    layer = int8_layer(n_in, n_out, bias=bias, seed=n_in + rows)
    x = on_int8_blocks(rows, n_in, seed=rows)
    got = any_build.int8_linear(x, layer.weight, layer.weight_scale, layer.bias)
    assert ((got - layer.reference(x)).abs() <= float_rounding(x, layer.dequantized())).all()


def test_int8_within_half_an_int8_step_of_each_activation_block(any_build):
    layer = int8_layer(256, 50, bias=True, seed=1)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    x[1] = 0.0
    x[2, :32] *= 1e-3
    got = any_build.int8_linear(x, layer.weight, layer.weight_scale, layer.bias)
    ref = layer.reference(x)
    half_step = x.abs().view(5, -1, 32).amax(dim=-1) / 254  # (rows, blocks)
    w_abs = layer.dequantized().abs().view(50, -1, 32).sum(dim=-1)  # (out, blocks)
    assert ((got - ref).abs() <= half_step @ w_abs.t() + 1e-5).all()
    assert torch.equal(got[1], ref[1]) and not torch.equal(got, ref)


def test_int8_layer_runs_it_and_still_trains_what_is_below(kernels):
    layer = int8_layer(128, 24, bias=True, seed=3)
    layer.kernel = "native"
    x = on_int8_blocks(4, 128, seed=4)
    torch.testing.assert_close(layer(x.view(2, 2, 128)).view(4, 24), layer.reference(x), rtol=1e-5, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    # LoRA below a frozen int8 layer: the forward is the kernel's, the gradient the dequantized weight's.
    xg = torch.randn(3, 128, requires_grad=True)
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, layer.dequantized().sum(0).expand(3, 128), rtol=1e-5, atol=1e-6)
    odd = int8_layer(96, 8, bias=False, seed=5)  # in = 96: not whole chunks of 64, so another kernel runs
    odd.kernel = "native"
    xo = torch.randn(2, 96)
    assert (odd(xo) - odd.reference(xo)).norm() / odd.reference(xo).norm() < 0.02


def test_int8_choice_takes_the_native_kernel_only_when_its_whole_step_is_faster():
    from scratchgpt import GPT, GPTConfig
    from scratchgpt.model.quantize import Int8Linear, choose_int8_kernel, default_kernel, quantize_model

    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=64, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0)).eval()
    q = quantize_model(model, "int8", kernel="reference")
    base = default_kernel("cpu")
    kernels_of = lambda: {m.kernel for m in q.modules() if isinstance(m, Int8Linear)}  # noqa: E731
    assert choose_int8_kernel(q, step_time=lambda k: {base: 1.0, "native": 0.7}[k]) == "native"
    assert kernels_of() == {"native"}
    assert choose_int8_kernel(q, step_time=lambda k: {base: 1.0, "native": 1.2}[k]) == base
    assert kernels_of() == {base}


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path, monkeypatch):
    """torch's builder waits while its lock file exists; one left by a killed build (older than any build
    takes) is removed before the builder runs, one of a build in progress is left alone."""
    import os
    import time

    from torch.utils import cpp_extension

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the kernels are built on x86-64 only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen: list[bool] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(lock.exists()) or "built")
    folder = native.kernel_dir() / native._name()
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.write_text("")
    old = time.time() - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert native.build() == "built" and seen == [False]  # the stale lock was gone when the builder ran
    lock.write_text("")  # a fresh one: another process is building right now
    assert native.build() == "built" and seen == [False, True]


@pytest.mark.skipif(not fbgemm_available(), reason="the many-row path is fbgemm's")
def test_a_prefill_of_many_rows_goes_to_fbgemm_and_a_decode_step_to_the_kernel(kernels):
    """The kernels re-read the weights per activation row: past native.MAX_ROWS rows the layers hand the
    product to fbgemm's matrix product (measured 4x faster at 1,024 rows), below it they run the kernel."""
    from scratchgpt.model.quantize import Int8Linear

    lin = torch.nn.Linear(256, 40)

    def set_kernel(layer, kernel: str) -> None:
        layer.use(kernel) if isinstance(layer, Int4Linear) else setattr(layer, "kernel", kernel)

    for layer in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin)):
        def direct(x, layer=layer):
            if isinstance(layer, Int4Linear):
                return kernels.int4_linear(x, layer.weight, layer.weight_scale, layer.bias, layer.group_size)
            return kernels.int8_linear(x, layer.weight, layer.weight_scale, layer.bias)

        for rows in (1, native.MAX_ROWS, native.MAX_ROWS + 1, 64):
            x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(rows))
            set_kernel(layer, "fbgemm")
            by_fbgemm = layer(x)
            set_kernel(layer, "native")
            got = layer(x)
            assert not torch.equal(by_fbgemm, direct(x))  # the two paths are told apart by their rounding
            assert torch.equal(got, direct(x) if rows <= native.MAX_ROWS else by_fbgemm), (type(layer).__name__, rows)


def test_a_non_finite_activation_gives_nan_outputs_not_garbage(any_build):
    """An inf or NaN in an activation row: that row's outputs are NaN (as a float product's would be), the
    other rows are untouched, and nothing non-finite is ever converted to an integer."""
    layer4 = layer_of(256, 16, 32, bias=True, seed=8)
    layer8 = int8_layer(256, 16, bias=True, seed=8)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(9))
    bad = x.clone()
    bad[1, 5] = float("inf")
    bad[2, 200] = float("nan")
    for run in (lambda t: any_build.int4_linear(t, layer4.weight, layer4.weight_scale, layer4.bias, 32),
                lambda t: any_build.int8_linear(t, layer8.weight, layer8.weight_scale, layer8.bias)):
        y = run(bad)
        assert torch.isnan(y[1:]).all()
        assert torch.equal(y[0], run(x)[0])


# ---------------------------------------------------------------------------------------------------------------
# The float kernel (model/csrc/float_linear.cpp): float32 and bfloat16 weights as stored, a few rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_in", "n_out"), [(768, 37), (769, 200), (13, 5), (64, 1), (48, 130)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
def test_float_kernel_equals_the_float_product_up_to_summation_order(any_build, dtype, n_in, n_out, rows):
    """Every code path, the columns' tails (K not a multiple of the vector width), the rows' tails (N not a
    multiple of the four streams per band), 1-4 rows per pass and more rows in several passes: the product
    of the weights as stored (bf16 widened exactly) with the float32 activation, plus the bias."""
    gen = torch.Generator().manual_seed(n_in * 31 + rows)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    x, b = torch.randn(rows, n_in, generator=gen), torch.randn(n_out, generator=gen)
    exact = x.double() @ w.double().t()
    bound = float_rounding(x, w.float())
    assert ((any_build.float_linear(x, w, None) - exact).abs() <= bound).all()
    assert ((any_build.float_linear(x, w, b) - (exact + b.double())).abs() <= bound + 1e-6).all()


def test_float_kernel_keeps_the_activation_dtype_and_refuses_what_it_cannot_read(kernels):
    w = torch.randn(24, 40)
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    y = kernels.float_linear(x, w, None)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ w.t(), rtol=2e-2, atol=5e-2)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.float_linear(torch.randn(1, 40), w.t().contiguous().t(), None)  # input-major storage
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.float_linear(torch.randn(1, 40), w.half(), None)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.float_linear(torch.randn(1, 41), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.float_linear(torch.randn(1, 40), w, torch.randn(23))


def test_linear_takes_the_float_kernel_for_a_few_rows_only(kernels, monkeypatch):
    """`Linear.native` sends up to MAX_ROWS rows to the kernel and more (a prefill) to F.linear; a layer
    whose weight is not in (out, in) order takes F.linear too. Same numbers up to rounding."""
    from scratchgpt.model.fast_linear import Linear, store_input_major

    calls = []
    monkeypatch.setattr(kernels, "float_linear", lambda *a, f=kernels.float_linear: calls.append(1) or f(*a))
    torch.manual_seed(0)
    layer = Linear(96, 40).requires_grad_(False)
    layer.native = True
    for rows in (1, native.MAX_ROWS, native.MAX_ROWS + 1):
        x = torch.randn(1, rows, 96)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert len(calls) == 2
    store_input_major([layer])
    layer(torch.randn(1, 96))
    assert len(calls) == 2
    # Gradients wanted (a model that trains after a sample was decoded with it): F.linear, gradients exact.
    trained = Linear(96, 40)
    trained.native = True
    x = torch.randn(2, 96, requires_grad=True)
    trained(x).sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(x.grad, trained.weight.sum(0).expand(2, 96).detach())
    assert trained.weight.grad is not None
    with torch.no_grad():
        trained(torch.randn(1, 96))
    assert len(calls) == 3
    layer.half()  # float16 weights: not the kernel's (float32 or bf16), F.linear
    layer(torch.randn(1, 96, dtype=torch.float16))
    assert len(calls) == 3


def test_code_paths_name_the_paths_this_build_runs(kernels) -> None:
    paths = native.code_paths()
    assert paths == {"quantized": kernels.instruction_set(), "float": kernels.float_instruction_set()}
    assert paths["quantized"] in ("avx512_vnni", "avx2", "scalar") and paths["float"] in ("avx512", "avx2", "scalar")
