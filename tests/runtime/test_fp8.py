"""DeepSeek-V3's block-scaled FP8 checkpoint format: loading, quantizing, sharding, serving.

The reference for every check is the same model written as a plain fp32 checkpoint holding the FP8
weights dequantized here, independently of the runtime (``W_fp8 × scale`` per 128×128 block): the FP8
load must give the same weights, hence the same logits.

transformers is not a reference for the FP8 files themselves: its fine-grained FP8 integration needs
``accelerate`` (not a dependency here) and on a machine without a GPU it only dequantizes to bf16 (it
refuses to run FP8 on the CPU), so the check against transformers runs on the dequantized fp32 checkpoint
(``test_transformers_on_the_dequantized_checkpoint_agrees``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from runtime.config import ConfigError
from runtime.loader import CheckpointError, load_model
from runtime.parallel.dist import ParallelState
from runtime.parallel.layout import ParallelLayout
from runtime.quant import fp8
from runtime.tiny import make_tiny
from tests.runtime.decoding import prefill_then_decode, rel

REPO = Path(__file__).resolve().parents[2]
BLOCK = 128
# tensor-parallel shards of every split dim fall on 128-wide scale blocks at --tp 2 (see test_tp_ep_shards)
ALIGNED = {
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "n_shared_experts": 2,
}


def dequantize_folder(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint ``src`` as a plain fp32 one: each e4m3 weight times its block scales."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    every = {k: v for shard in shards for k, v in load_file(dst / shard).items()}  # a scale may sit in the next shard
    for shard in shards:
        out = {}
        for name, t in load_file(dst / shard).items():
            if name.endswith("_scale_inv"):
                continue
            sname = name + "_scale_inv"
            if sname in every:
                s = every[sname]
                rows = s.repeat_interleave(BLOCK, 0)[: t.shape[0]]
                t = t.float() * rows.repeat_interleave(BLOCK, 1)[:, : t.shape[1]]
            out[name] = t.float().contiguous()
        save_file(out, str(dst / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
    index_file.write_text(json.dumps(index))
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def fp8_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch → (FP8 checkpoint, its dequantized fp32 twin); tiny dims, so partial last scale blocks."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for arch, seed in (("v2", 11), ("v3", 13)):
        q = make_tiny(root / f"{arch}_fp8", arch=arch, seed=seed, fp8=True)
        out[arch] = (q, dequantize_folder(q, root / f"{arch}_deq"))
    return out


@pytest.fixture
def v3_fp8(fp8_pairs, tmp_path: Path) -> Path:
    dst = tmp_path / "v3_fp8"
    shutil.copytree(fp8_pairs["v3"][0], dst)
    return dst


# ---- the format ---------------------------------------------------------------------------------------


def test_quantize_round_trip_and_partial_blocks() -> None:
    """Block absmax → 448; the error is e4m3's (3 mantissa bits: ≤ 1/16 of a value, relative) per element,
    and partial last blocks get their own scale."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    w[:128, :128] *= 100  # one block far larger: its scale must not leak into the others
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (3, 2) == (math.ceil(300 / 128), math.ceil(200 / 128))
    assert q.float().abs().amax().item() == 448.0
    back = fp8.dequantize(q, s)
    small = w.abs() > 1e-2 * w.abs().amax()  # away from e4m3's subnormals
    assert ((back - w).abs() / w.abs())[small].max().item() <= 1 / 16
    assert torch.allclose(s[2, 1], w[256:, 128:].abs().amax() / 448.0)
    assert (fp8.quantize(torch.zeros(5, 7))[1] == 1).all()


@pytest.mark.parametrize("arch", ["v2", "v3"])
def test_fp8_checkpoint_equals_its_dequantized_twin(fp8_pairs, arch: str) -> None:
    """CPU fp32: the FP8 load dequantizes to exactly the twin's weights; prefill (two packed sequences) and
    six greedy decode steps through the paged cache agree to 1e-5."""
    q, deq = fp8_pairs[arch]
    got, ref = load_model(q), load_model(deq)
    gs, rs = got.state_dict(), ref.state_dict()
    assert gs.keys() == rs.keys()
    for name in rs:
        assert torch.equal(gs[name], rs[name]), name
    with open(q / "config.json") as fh:
        assert json.load(fh)["quantization_config"]["weight_block_size"] == [128, 128]
    for a, b in zip(prefill_then_decode(got, [9, 5], 6), prefill_then_decode(ref, [9, 5], 6), strict=True):
        assert rel(a, b) <= 1e-5


def test_which_tensors_are_fp8(fp8_pairs) -> None:
    """Projections FP8 with fp32 scales; embeddings, norms, router gate, lm_head bf16; V3's correction
    bias fp32."""
    q = fp8_pairs["v3"][0]
    dtypes = {}
    for f in q.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                dtypes[k] = sf.get_slice(k).get_dtype()
    assert dtypes["model.layers.1.self_attn.kv_b_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.experts.3.down_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.0.mlp.gate_proj.weight_scale_inv"] == "F32"
    for bf16 in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        assert dtypes[bf16] == "BF16", bf16
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"


def test_transformers_on_the_dequantized_checkpoint_agrees(fp8_pairs) -> None:
    transformers = pytest.importorskip("transformers")
    q, deq = fp8_pairs["v3"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    ours = load_model(q)
    ids = list(range(5, 30))
    from runtime.kv_cache import prefill_metadata

    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
        out = ours(torch.tensor(ids), torch.arange(len(ids)), prefill_metadata([len(ids)], [len(ids)], None, None))
    assert rel(out, ref) < 1e-4


def test_mtp_layer_is_skipped_with_a_log_line(v3_fp8: Path, caplog) -> None:
    """DeepSeek-V3 ships its multi-token-prediction module as layer ``num_hidden_layers`` (FP8 too)."""
    cfg = json.loads((v3_fp8 / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (v3_fp8 / "config.json").write_text(json.dumps(cfg))
    n = cfg["num_hidden_layers"]
    mtp = {
        f"model.layers.{n}.eh_proj.weight": torch.randn(64, 128).bfloat16(),
        f"model.layers.{n}.enorm.weight": torch.ones(64).bfloat16(),
    }
    (
        mtp[f"model.layers.{n}.mlp.experts.0.up_proj.weight"],
        mtp[f"model.layers.{n}.mlp.experts.0.up_proj.weight_scale_inv"],
    ) = fp8.quantize(torch.randn(32, 64))
    save_file(mtp, str(v3_fp8 / "model-mtp.safetensors"))
    index = json.loads((v3_fp8 / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
    (v3_fp8 / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.INFO, logger="runtime.loader"):
        model = load_model(v3_fp8)
    assert model.num_layers == n
    assert (
        f"skipping 4 checkpoint tensor(s) the model does not run (multi-token-prediction layer(s) model.layers.{n}"
        in caplog.text
    )


# ---- bad files ----------------------------------------------------------------------------------------


def _edit(path: Path, edit) -> None:
    """Rewrite every shard through ``edit(name → tensor dict)`` and the index to match."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    wm = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = edit(dict(load_file(path / shard)))
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        wm.update(dict.fromkeys(tensors, shard))
    index["weight_map"] = wm
    index_file.write_text(json.dumps(index))


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


def test_missing_scale_names_the_tensor(v3_fp8: Path) -> None:
    _edit(v3_fp8, lambda t: {k: v for k, v in t.items() if k != KV_B + "_scale_inv"})
    with pytest.raises(CheckpointError) as exc:
        load_model(v3_fp8)
    assert f"{KV_B}_scale_inv: missing; expected the block scales of {KV_B}: [1, 1] fp32 ([128, 32]" in str(exc.value)


def test_misshaped_scale_names_the_tensor_and_the_expected_shape(v3_fp8: Path) -> None:
    def edit(t):
        if KV_B + "_scale_inv" in t:
            t[KV_B + "_scale_inv"] = torch.ones(2, 1)
        return t

    _edit(v3_fp8, edit)
    with pytest.raises(CheckpointError, match=rf"{KV_B}_scale_inv: shape \[2, 1\], expected \[1, 1\] fp32"):
        load_model(v3_fp8)


def test_unquantized_weight_and_stray_scale_are_reported_together(v3_fp8: Path) -> None:
    o = "model.layers.2.self_attn.o_proj.weight"

    def edit(t):
        if o in t:
            t[o] = t[o].bfloat16()
        if "lm_head.weight" in t:
            t["lm_head.weight_scale_inv"] = torch.ones(4, 1)
        return t

    _edit(v3_fp8, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(v3_fp8)
    msg = str(exc.value)
    assert f"{o}: dtype BF16, expected F8_E4M3" in msg
    assert "lm_head.weight_scale_inv: a block scale with no FP8 weight lm_head.weight" in msg


def test_fp8_tensors_without_quantization_config(v3_fp8: Path) -> None:
    cfg = json.loads((v3_fp8 / "config.json").read_text())
    del cfg["quantization_config"]
    (v3_fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json has no quantization_config"):
        load_model(v3_fp8)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("quant_method", "awq", r"'quantization_config.quant_method' has unsupported value 'awq'; allowed: fp8"),
        ("fmt", "e5m2", r"'quantization_config.fmt' has unsupported value 'e5m2'; allowed: e4m3"),
        ("weight_block_size", [64, 64], r"'quantization_config.weight_block_size' .*\[64, 64\]; allowed: \[128, 128\]"),
        ("activation_scheme", "static", r"'quantization_config.activation_scheme' .*'static'; allowed: dynamic"),
    ],
)
def test_unknown_quantization_config(v3_fp8: Path, field: str, value, pattern: str) -> None:
    cfg = json.loads((v3_fp8 / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (v3_fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=pattern):
        load_model(v3_fp8)


def test_tp_split_off_the_scale_blocks_is_an_error(fp8_pairs, tmp_path: Path) -> None:
    """The default tiny dims split at --tp 2 into 64-row shards: no rank can own whole 128-row blocks, whether
    the weights are dequantized at load or kept in FP8; kept FP8 experts also need a block-aligned gate / up
    split."""
    ps = ParallelState(ParallelLayout(2, 1, 2), rank=1)
    pattern = r"does not fall on 128-wide FP8 scale blocks; choose --tp"
    with pytest.raises(CheckpointError, match=pattern):
        load_model(fp8_pairs["v2"][0], parallel=ps)
    off = make_tiny(tmp_path / "off", arch="v2", seed=1, fp8=True, **{**ALIGNED, "qk_nope_head_dim": 32})
    with pytest.raises(CheckpointError, match=r"q_proj.weight: the tensor-parallel shard \[192:384\] of dim 0"):
        load_model(off, parallel=ps, fp8="keep")
    with pytest.raises(ValueError, match="moe_intermediate_size 32 is not a multiple of the FP8 block 128"):
        load_model(fp8_pairs["v2"][0], fp8="keep")


# ---- quantize, shards, serve ----------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process (a subprocess per call would re-import torch each time)."""
    from runtime.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_quantize_cli_writes_what_make_tiny_fp8_writes(tmp_path: Path, capsys) -> None:
    """``moe-runtime quantize`` of a plain tiny checkpoint = ``moe-runtime make-tiny --fp8`` of the same seed,
    tensor for tensor (scales included); quantizing an FP8 folder again is refused with exit 2."""
    plain = make_tiny(tmp_path / "plain", arch="v3", seed=5)
    direct = tmp_path / "direct"
    made = _cli(capsys, "make-tiny", str(direct), "--arch", "v3", "--seed", "5", "--fp8")
    assert made.returncode == 0 and "fp8 checkpoint" in made.stdout, made.stderr
    res = _cli(capsys, "quantize", str(plain), str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((direct / "config.json").read_text())["quantization_config"]
    a = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(direct.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and len(list(out.glob("*.safetensors"))) == 2
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert (out / "tokenizer.json").is_file()
    again = _cli(capsys, "quantize", str(out), str(tmp_path / "again"))
    assert again.returncode == 2 and "already has a quantization_config" in again.stderr


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch → (block-aligned FP8 checkpoint, its dequantized twin): every --tp 2 shard of a split dim is a
    whole number of 128-wide blocks, and the experts' gate / up split falls on a block boundary."""
    root = tmp_path_factory.mktemp("fp8_aligned")
    out = {}
    for arch, seed in (("v2", 21), ("v3", 23)):
        q = make_tiny(root / f"{arch}_fp8", arch=arch, seed=seed, fp8=True, **ALIGNED)
        out[arch] = (q, dequantize_folder(q, root / f"{arch}_deq"))
    return out


@pytest.mark.parametrize("arch", ["v2", "v3"])
def test_fp8_resident_model_equals_the_dequantized_twin(aligned, arch: str) -> None:
    """``fp8="keep"`` (the GPU's way): projections are Fp8Linear, expert stacks FP8 with their scales, and the
    checkpoint's names still map one-to-one. On the CPU each runs its dequantizing reference, so prefill and
    decode equal the twin's with the fused decode kernel's dispatch and the default one."""
    from runtime.execution import ExecutionOptions, MoEImpl
    from runtime.quant.fp8 import Fp8Linear

    q, deq = aligned[arch]
    got, ref = load_model(q, fp8="keep"), load_model(deq)
    attn, moe = got.model.layers[1].self_attn, got.model.layers[1].mlp
    assert isinstance(attn.o_proj, Fp8Linear) and not isinstance(attn.kv_b_proj, Fp8Linear)
    assert moe.w13.dtype == torch.float8_e4m3fn and moe.w13_scale.dtype == torch.float32
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in got.state_dict()
    for impl in (MoEImpl.AUTO, MoEImpl.FUSED):
        got.configure(ExecutionOptions(moe_impl=impl))
        ref.configure(ExecutionOptions(moe_impl=impl))
        for a, b in zip(prefill_then_decode(got, [7, 4], 3), prefill_then_decode(ref, [7, 4], 3), strict=True):
            assert rel(a, b) <= 1e-5, impl


@pytest.mark.slow
def test_tp_ep_shards_equal_one_process(aligned, tmp_path: Path) -> None:
    """Under --tp 2, --ep 2 and both, each rank reads its rows / columns of the FP8 weights and the matching
    scale blocks: dequantized at load (the CPU's way), and kept in FP8 (the GPU's way, references on CPU)."""
    from tests.runtime.test_parallel import assert_same, compute, run_spmd

    names = {arch: q for arch, (q, _) in aligned.items()}
    refs = {arch: compute(load_model(deq)) for arch, (_, deq) in aligned.items()}
    (tmp_path / "dequantize").mkdir()
    (tmp_path / "keep").mkdir()
    results = run_spmd(names, 2, [(2, 1), (1, 2), (2, 2)], tmp_path / "dequantize")
    for (name, tp, ep), got in results.items():
        assert_same(got, refs[name], f"fp8 {name} --tp {tp} --ep {ep}")
    results = run_spmd(names, 2, [(2, 1), (2, 2)], tmp_path / "keep", fp8="keep")
    for (name, tp, ep), got in results.items():
        assert_same(got, refs[name], f"fp8 kept {name} --tp {tp} --ep {ep}")


@pytest.mark.slow
def test_serve_fp8_completions_equal_the_dequantized_model(fp8_pairs, tmp_path: Path) -> None:
    """Real HTTP: ``moe-runtime serve`` on the FP8 folder and on its dequantized twin give the same greedy
    completions."""
    from tests.runtime.service.conftest import run_server

    q, deq = fp8_pairs["v2"]
    prompts = ["The order was placed at night", "Risk score:", "User: Is the order risky? Assistant:"]
    texts = {}
    for name, path in (("fp8", q), ("deq", deq)):
        with run_server(path, "--no-warmup", log_dir=tmp_path) as srv:
            texts[name] = []
            for p in prompts:
                r = httpx.post(
                    srv.url + "/v1/completions",
                    json={"model": path.name, "prompt": p, "max_tokens": 12, "temperature": 0},
                    timeout=60,
                )
                assert r.status_code == 200, r.text
                texts[name].append(r.json()["choices"][0]["text"])
    assert texts["fp8"] == texts["deq"]
    assert any(texts["fp8"])


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_the_cpu() -> None:
    """benchmarks/fp8_gpu.py gets one shot on a GPU: its tiny ``--smoke`` mode runs every model section here
    (FP8 vs dequantized bf16 agreement, decode, prefill, the V3 slice and its projection) without an error."""
    res = subprocess.run(
        [sys.executable, "benchmarks/fp8_gpu.py", "--smoke", "--device", "cpu", "--skip", "kernels", "sweep"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sections that failed" not in res.stdout, res.stdout
    assert "'greedy_token_agreement': 1.0" in res.stdout  # CPU: both run the same dequantized function
    assert "V3 x16 H100 projection B=2" in res.stdout
