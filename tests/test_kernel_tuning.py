"""Measured launch tables (kernels/tuning.py): a table's entry replaces the heuristic's config for its
shape bucket and the kernels stay right with it; malformed tables fail in one line naming the file and
the field; a table of another triton version is ignored; benchmarks/tune_kernels.py --smoke writes a
table that loads and drives the kernels.

Without a GPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), and
the table comes from BSHAREDRAG_KERNEL_TABLE, the one way a table reaches a non-CUDA device.
"""
import json
import os
import sys

import pytest
import torch

from conftest import triton_device

DEVICE = triton_device()
if DEVICE is None:
    pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1", allow_module_level=True)

try:
    from bsharedrag_fast import kernels  # noqa: E402
except ImportError:  # not installed: the source tree's kernels/ (as tune_kernels.py does too)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kernels  # noqa: E402
from bsharedrag_fast.util.pool_modes import POOL_MODES  # noqa: E402

tuning = sys.modules[kernels.__name__ + ".tuning"]
shrink_mod = sys.modules[kernels.__name__ + ".lora_shrink"]
expand_mod = sys.modules[kernels.__name__ + ".lora_expand"]
pool_mod = sys.modules[kernels.__name__ + ".pool"]
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
DEV = torch.device(DEVICE)
EPS = 1e-6
F32 = 4  # element size of the fp32 tensors used here


@pytest.fixture
def use_table(tmp_path, monkeypatch):
    """Writes a table (a dict, or raw text) and points BSHAREDRAG_KERNEL_TABLE at it; forgets it after."""
    def write(table, name="table.json"):
        path = tmp_path / name
        path.write_text(table if isinstance(table, str) else json.dumps(table))
        monkeypatch.setenv(tuning.ENV_TABLE, str(path))
        tuning.reset()
        return path

    yield write
    monkeypatch.delenv(tuning.ENV_TABLE, raising=False)
    tuning.reset()


def segments(counts):
    """LoRAMeta-style metadata: adapter a owns counts[a] consecutive rows."""
    i32 = dict(dtype=torch.int32, device=DEVICE)
    c = torch.tensor(counts)
    meta = (torch.arange(int(c.sum()), **i32), (c.cumsum(0) - c).to(**i32), c.to(**i32),
            torch.arange(len(counts), **i32))  # fmt: skip
    return meta, max(counts)


def check_shrink_expand(counts, K, N, R, seed=0):
    """lora_shrink and lora_expand (configs from whatever table is in force) against fp64 torch."""
    g = torch.Generator().manual_seed(seed)
    meta, max_count = segments(counts)
    T, L = sum(counts), len(counts)
    x = torch.randn(T, K, generator=g).to(DEVICE)
    a = (torch.randn(L, R, K, generator=g) / K**0.5).to(DEVICE)
    b = (torch.randn(L, N, R, generator=g) / R**0.5).to(DEVICE)
    scaling = (torch.rand(L, generator=g) + 0.5).to(DEVICE)
    adapter = torch.repeat_interleave(torch.arange(L), torch.tensor(counts)).to(DEVICE)
    v = torch.full((T, R), float("nan"), device=DEVICE)
    shrink_mod.lora_shrink(x, a, *meta, max_count, v)
    v_ref = torch.einsum("tk,trk->tr", x.double(), a.double()[adapter])
    torch.testing.assert_close(v.double(), v_ref, atol=1e-4, rtol=1e-4)
    y = torch.randn(T, N, generator=g).to(DEVICE)
    y_ref = y.double() + scaling.double()[adapter, None] * torch.einsum("tr,tnr->tn", v.double(), b.double()[adapter])
    expand_mod.lora_expand(v, b, scaling, *meta, max_count, y)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)


def pool_reference(hidden, cu, mode, w):
    """fp64, differentiable: RMSNorm (every token for mean), pool, L2."""
    h = hidden.double()
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * w.double()  # noqa: E731
    bounds = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    v = torch.stack([rms(h[e - 1]) if mode == "last" else rms(h[s:e]).mean(0) for s, e in bounds])
    return torch.nn.functional.normalize(v, dim=-1)


def check_pool(lens, d, seed=0):
    """pool_forward and pool_backward, last and mean (configs from the table in force), against fp64 torch."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(DEVICE)
    hidden = (torch.randn(sum(lens), d, generator=g) * 2).to(DEVICE)
    w = (torch.rand(d, generator=g) + 0.5).to(DEVICE)
    gy = torch.randn(len(lens), d, generator=g).to(DEVICE)
    for mode in ("last", "mean"):
        h64 = hidden.double().requires_grad_()
        ref = pool_reference(h64, cu, mode, w)
        ref.backward(gy.double())
        out = torch.full((len(lens), d), float("nan"), device=DEVICE)
        pool_mod.pool_forward(hidden, cu, POOL_MODES[mode], w, EPS, True, out)
        torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-5)
        gh = torch.full_like(hidden, float("nan"))
        pool_mod.pool_backward(hidden, cu, POOL_MODES[mode], w, EPS, True, gy, gh)
        torch.testing.assert_close(gh.double(), h64.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- buckets and keys


def test_bucket_rounds_up_to_powers_of_four_with_a_cap():
    assert [tuning.bucket(n) for n in (0, 1, 2, 4, 5, 16, 17, 64, 65, 4096, 4097, 10**6)] == \
        [1, 1, 4, 4, 16, 16, 64, 64, 256, 4096, 4096, 4096]  # fmt: skip
    assert tuning.bucket(10**6, cap=65536) == 65536 and tuning.bucket(5000, cap=65536) == 16384
    # a key buckets the size dims and keeps the model dims exact
    assert shrink_mod.shrink_key(9, 3, 576, 16, 2) == shrink_mod.shrink_key(16, 4, 576, 16, 2) == (16, 4, 576, 16, 2)
    assert shrink_mod.shrink_key(17, 4, 576, 16, 2) == (64, 4, 576, 16, 2)
    assert expand_mod.expand_key(1, 1, 960, 8, 2) == (1, 1, 960, 8, 2)
    assert pool_mod.pool_rows_key(576, 20, 2) == (576, 64, 2)
    assert pool_mod.pool_mean_key(576, 70_000, 2) == (576, 65536, 2)
    assert tuning.key_string((16, 4, 576, 16, 2)) == "16,4,576,16,2"
    assert tuning.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


# ----------------------------------------------------------------------------- entries used


def test_lora_entries_replace_the_heuristic_for_their_bucket(use_table):
    # K=40 does not divide by BLOCK_K * SPLIT_K = 48 (EVEN_K False), K=48 does; R=5 does not fill BLOCK_R=32
    shrink_entry = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, SPLIT_K=3, num_warps=8, num_stages=1)
    expand_entry = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_R=32, num_warps=8, num_stages=1)
    counts, N, R = [9, 3], 33, 5  # max_count 9 and 2 adapters: the bucket (16, 4)
    with tuning.using(None):
        heuristic = {K: shrink_mod.shrink_config(16, 4, K, R, F32, device=DEV) for K in (40, 48)}
        expand_heuristic = expand_mod.expand_config(16, 4, N, R, F32, device=DEV)
        other_bucket = shrink_mod.shrink_config(17, 2, 40, R, F32, device=DEV)
    ops = {"shrink": {tuning.key_string(shrink_mod.shrink_key(16, 4, K, R, F32)): shrink_entry for K in (40, 48)},
           "expand": {tuning.key_string(expand_mod.expand_key(16, 4, N, R, F32)): expand_entry}}
    use_table(tuning.make_table("test gpu", ops))

    for K, even in ((40, False), (48, True)):
        assert heuristic[K]["BLOCK_K"] != 16 and heuristic[K]["num_stages"] != 1  # the entry is distinctive
        cfg = shrink_mod.shrink_config(9, 2, K, R, F32, device=DEV)  # another size in the same bucket
        assert cfg == dict(shrink_entry, EVEN_K=even)
        assert tuning.lookup("shrink", shrink_mod.shrink_key(9, 2, K, R, F32), DEV) == shrink_entry
        # split_k still overrides, and EVEN_K follows it
        assert shrink_mod.shrink_config(9, 2, K, R, F32, split_k=1, device=DEV)["EVEN_K"] == (K % 16 == 0)
        check_shrink_expand(counts, K, N, R)
    assert expand_heuristic["BLOCK_R"] != 32
    assert expand_mod.expand_config(9, 2, N, R, F32, device=DEV) == dict(expand_entry, EVEN_R=False)
    # other buckets (here max_count 17 -> 64) keep the heuristic
    assert shrink_mod.shrink_config(17, 2, 40, R, F32, device=DEV) == other_bucket
    assert tuning.lookup("shrink", shrink_mod.shrink_key(17, 2, 40, R, F32), DEV) is None
    check_shrink_expand([17, 2], 40, N, R, seed=1)


def test_pool_entries_replace_the_heuristic_for_their_bucket(use_table):
    d, lens = 64, [5, 1, 17, 3, 40, 2]  # B 6 -> bucket 16, T 68 -> bucket 256
    rows_entry, mean_entry = dict(BLOCK_B=2, num_warps=1), dict(BLOCK_T=4, num_warps=2, programs_per_sm=64)
    with tuning.using(None):
        heuristic = pool_mod.pool_config(d, B=6, T=68, elem_size=F32, device=DEV)
    assert heuristic["rows"]["BLOCK_B"] != 2 and heuristic["mean"]["BLOCK_T"] != 4
    use_table(tuning.make_table("test gpu", {
        "pool_rows": {tuning.key_string(pool_mod.pool_rows_key(d, 6, F32)): rows_entry},
        "pool_mean": {tuning.key_string(pool_mod.pool_mean_key(d, 68, F32)): mean_entry}}))  # fmt: skip
    cfg = pool_mod.pool_config(d, B=6, T=68, elem_size=F32, device=DEV)
    # BLOCK_D and ONE_CHUNK still follow from d
    assert cfg == dict(rows=dict(rows_entry, BLOCK_D=64, ONE_CHUNK=True),
                       mean=dict(BLOCK_T=4, num_warps=2, BLOCK_D=64, ONE_CHUNK=True), programs_per_sm=64)
    # with 64 programs per SM the mean kernel's tiles are the smallest (16 rows): sequences cross them
    assert pool_mod.mean_rows_per_program(68, 4, pool_mod.num_sms(DEV), 64) == pool_mod.MIN_ROWS
    check_pool(lens, d)


# ----------------------------------------------------------------------------- bad tables


def good_table():
    return tuning.make_table("test gpu", {"shrink": {"16,4,40,5,4": dict(
        BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, SPLIT_K=3, num_warps=8, num_stages=1)}})


def corrupt(field, value):
    table = good_table()
    entry = table["ops"]["shrink"]["16,4,40,5,4"]
    if value is None:
        del entry[field]
    else:
        entry[field] = value
    return table


@pytest.mark.parametrize("table,field", [
    (corrupt("BLOCK_M", 24), "BLOCK_M"),  # not a power of two
    (corrupt("SPLIT_K", 0), "SPLIT_K"),
    (corrupt("BLOCK_K", 16.0), "BLOCK_K"),  # not an int
    (corrupt("num_stages", None), "num_stages"),  # missing
    (corrupt("EVEN_K", True), "EVEN_K"),  # derived from the shape: never from a table
    (dict(good_table(), ops={"shrink": {"16,4,40": good_table()["ops"]["shrink"]["16,4,40,5,4"]}}), "16,4,40"),
    (dict(good_table(), ops={"shrinkk": {}}), "shrinkk"),
    (dict(good_table(), format=2), "format"),
    ({k: v for k, v in good_table().items() if k != "gpu"}, "gpu"),
    ('{"format": 1,', "line 1"),
], ids=["pow2", "split_k", "float", "missing", "derived", "key", "op", "format", "no_gpu", "json"])  # fmt: skip
def test_malformed_table_is_a_one_line_error_naming_file_and_field(use_table, table, field):
    path = use_table(table)
    with pytest.raises(ValueError) as err:
        tuning.load(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg.split(str(path))[1] and "\n" not in msg, msg
    with pytest.raises(ValueError, match="kernel table"):  # the kernels' lookup path says the same
        shrink_mod.shrink_config(16, 4, 40, 5, F32, device=DEV)


def test_table_of_another_triton_version_is_ignored_with_a_warning(use_table):
    table = good_table()
    table["triton"] = "0.1.0"
    use_table(table)
    with pytest.warns(UserWarning, match="triton 0.1.0") as rec:
        cfg = shrink_mod.shrink_config(16, 4, 40, 5, F32, device=DEV)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    with tuning.using(None):
        assert cfg == shrink_mod.shrink_config(16, 4, 40, 5, F32, device=DEV)  # the heuristic
    assert tuning.table_for(DEV) is None


# ----------------------------------------------------------------------------- tune_kernels.py


def test_tune_kernels_smoke_writes_a_table_that_drives_the_kernels(tmp_path, use_table, capsys):
    sys.path.insert(0, BENCHMARKS)
    try:
        import tune_kernels
    finally:
        sys.path.remove(BENCHMARKS)
    assert tune_kernels.main(["--device", DEVICE, "--dtype", "float32", "--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and "wrote" in out
    (path,) = tmp_path.glob("*.json")
    table = tuning.load(path)
    raw = json.loads(path.read_text())
    assert raw["skipped_keys"] == 0
    for op in ("shrink", "expand", "pool_rows", "pool_mean"):  # --smoke writes every measured key
        assert table.ops[op] and set(table.ops[op]) == set(raw["measured"][op]), op
        for m in raw["measured"][op].values():
            assert m["best_us"] <= m["heuristic_us"] and m["entry"]
    use_table(path.read_text(), name=path.name)
    for key, entry in table.ops["shrink"].items():
        count, n_ad, K, R, elem = map(int, key.split(","))
        (N,) = {int(k.split(",")[2]) for k in table.ops["expand"]}
        expand_entry = table.ops["expand"][tuning.key_string((count, n_ad, N, R, elem))]
        assert elem == F32
        assert {k: v for k, v in shrink_mod.shrink_config(count, n_ad, K, R, F32, device=DEV).items()
                if k != "EVEN_K"} == entry  # fmt: skip
        assert {k: v for k, v in expand_mod.expand_config(count, n_ad, N, R, F32, device=DEV).items()
                if k != "EVEN_R"} == expand_entry  # fmt: skip
        check_shrink_expand([count] * n_ad, K, N, R)
    for key, entry in table.ops["pool_mean"].items():
        d, tokens, _ = map(int, key.split(","))
        lens = [tokens // 4 - 5, 7, 1, 3]  # the same token bucket
        assert pool_mod.pool_config(d, B=4, T=sum(lens), elem_size=F32, device=DEV)["programs_per_sm"] == \
            entry["programs_per_sm"]  # fmt: skip
        check_pool(lens, d)
