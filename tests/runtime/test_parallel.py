"""Tensor / expert parallelism on CPU: gloo process groups on loopback, real sharded safetensors loads.

Each multi-process check runs this file as a script once per rank (``python test_parallel.py --spmd``,
the environment torchrun would set): every rank loads its shard, runs the same packed prefill and the
same greedy generation, and rank 0 saves logits and tokens for the test to compare with one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infra.embedded.emulator.process import free_port
from runtime.config import ModelConfig
from runtime.parallel.layout import LayoutError, ParallelLayout

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[0, 5, 9, 33, 7, 100, 42, 8, 3], [0, 77, 12, 250, 6]]
NEW_TOKENS = 6
KERNELS_ENV = "MOEFLEET_TEST_DECODE_KERNELS"
FP8_ENV = "MOEFLEET_TEST_FP8"  # load_model's fp8 mode for FP8 checkpoints (tests/runtime/test_fp8.py)


# ---- what every rank (or the single process) computes ---------------------------------------------


def compute(model) -> dict:
    """Logits of a packed two-prompt prefill (no cache) and greedy tokens through the paged cache."""
    from runtime.generate import Generator
    from runtime.kv_cache import prefill_metadata
    from runtime.sampling import SamplingParams

    lens = [len(p) for p in PROMPTS]
    ids = torch.tensor([t for p in PROMPTS for t in p])
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        logits = model(ids, pos, prefill_metadata(lens, lens, None, None))
    gen = Generator(model, max_batch=2, max_model_len=64)
    out = gen.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return {"logits": logits, "tokens": [r.token_ids for r in out]}


def spmd_main(ckpts: dict[str, str], layouts: list[tuple[int, int]], out_dir: str) -> None:
    import torch.distributed as dist

    from runtime.loader import load_model
    from runtime.parallel.dist import make_groups, world_from_env

    torch.set_num_threads(1)
    rank, world, _ = world_from_env()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for tp, ep in layouts:
        ps = make_groups(ParallelLayout(tp, ep, world).validate(), rank, 0, 60.0)
        for name, ckpt in ckpts.items():
            model = load_model(ckpt, parallel=ps, fp8=os.environ.get(FP8_ENV) or "auto")
            if os.environ.get(KERNELS_ENV):  # the decode kernels' dispatch (their references on CPU)
                from runtime.execution import AttentionDecode, ExecutionOptions, MoEImpl

                model.configure(ExecutionOptions(moe_impl=MoEImpl.FUSED, attention_decode=AttentionDecode.PAGED))
            res = compute(model)
            if rank == 0:
                torch.save(res, Path(out_dir) / f"{name}_tp{tp}_ep{ep}.pt")
        dist.barrier()
    dist.destroy_process_group()


def run_spmd(
    ckpts: dict[str, Path],
    world: int,
    layouts: list[tuple[int, int]],
    out: Path,
    kernels: bool = False,
    fp8: str = "",
) -> dict:
    """{(checkpoint name, tp, ep): rank 0's results}; every rank is a process started as torchrun would."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        env[KERNELS_ENV] = "1" if kernels else ""
        env[FP8_ENV] = fp8
        paths = json.dumps({k: str(v) for k, v in ckpts.items()})
        cmd = [sys.executable, __file__, "--spmd", paths, json.dumps(layouts), str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=150)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return {(n, tp, ep): torch.load(out / f"{n}_tp{tp}_ep{ep}.pt") for n in ckpts for tp, ep in layouts}


def assert_same(got: dict, ref: dict, what: str) -> None:
    err = ((got["logits"] - ref["logits"]).norm() / ref["logits"].norm()).item()
    assert err < 1e-5, f"{what}: relative logits error {err:.2e}"
    assert got["tokens"] == ref["tokens"], what


# ---- tests -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(ckpts) -> dict[str, dict]:
    from runtime.loader import load_model

    return {name: compute(load_model(ckpts[name])) for name in ("v2_greedy", "v3_noaux")}


def test_two_ranks_tp_ep_and_both_equal_one_process(ckpts, references, tmp_path) -> None:
    """V2 (softmax greedy routing, 2 shared experts, q_proj) and V3 (sigmoid noaux_tc, 1 shared expert,
    q_lora) under --tp 2, --ep 2 and both (shared experts fused into the EP all-reduce)."""
    names = {n: ckpts[n] for n in ("v2_greedy", "v3_noaux")}
    results = run_spmd(names, 2, [(2, 1), (1, 2), (2, 2)], tmp_path)
    for (name, tp, ep), got in results.items():
        assert_same(got, references[name], f"{name} --tp {tp} --ep {ep}")


def test_decode_kernels_under_tp_and_ep_equal_one_process(ckpts, references, tmp_path) -> None:
    """The fused-MoE and paged-attention dispatch under each 2-rank layout: EP offsets (pairs routed to the
    other rank add nothing), shared experts inside the kernel when their TP partial joins the EP all-reduce
    (--tp 2 --ep 2) and outside it otherwise, paged attention over a rank's heads (--tp 2)."""
    results = run_spmd({"v2_greedy": ckpts["v2_greedy"]}, 2, [(2, 1), (1, 2), (2, 2)], tmp_path, kernels=True)
    for (name, tp, ep), got in results.items():
        assert_same(got, references[name], f"{name} --tp {tp} --ep {ep} with the decode kernels")


@pytest.mark.slow
def test_four_ranks_node_style_layouts_equal_one_process(ckpts, references, tmp_path) -> None:
    """--tp 2 --ep 4 is the two-node shape in miniature (TP inside a node, EP across); --tp 4 --ep 2
    repeats each expert shard twice while attention is split four ways."""
    results = run_spmd({"v3_noaux": ckpts["v3_noaux"]}, 4, [(2, 4), (4, 2)], tmp_path)
    for (_, tp, ep), got in results.items():
        assert_same(got, references["v3_noaux"], f"--tp {tp} --ep {ep}")


def test_watchdog_trips_on_an_overdue_operation_only() -> None:
    from runtime.parallel.lockstep import Watchdog

    tripped: list[str] = []
    dog = Watchdog(tripped.append)
    with dog.guard("quick", 5.0):
        pass
    with dog.guard("stuck all-reduce", 0.2):
        time.sleep(1.5)
    assert tripped == ["stuck all-reduce"]


def test_each_rank_loads_only_its_shard(v2_path: Path) -> None:
    """Rank 1 of --tp 2 --ep 2: its experts only (global names kept), the second half of each
    column-parallel weight, the second half of each row-parallel weight's input features."""
    from runtime.loader import load_model
    from runtime.parallel.dist import ParallelState

    full = load_model(v2_path)
    ps = ParallelState(ParallelLayout(2, 2, 2), rank=1)
    part = load_model(v2_path, parallel=ps)
    fs, ps_ = full.state_dict(), part.state_dict()
    experts = {n.split(".experts.")[1].split(".")[0] for n in ps_ if ".experts." in n}
    assert experts == {"4", "5", "6", "7"}
    assert set(ps_) < set(fs)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ps_[q], fs[q].chunk(2, 0)[1])
    o = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(ps_[o], fs[o].chunk(2, 1)[1])
    e = "model.layers.1.mlp.experts.5.down_proj.weight"
    assert torch.equal(ps_[e], fs[e])
    moe = part.model.layers[1].mlp
    assert moe.w13.shape[0] == 4 and moe.expert_offset == 4
    assert torch.equal(ps_["lm_head.weight"], fs["lm_head.weight"])


def test_layout_errors_name_the_flag_the_value_and_what_is_allowed(v2_path: Path) -> None:
    cfg = ModelConfig.from_json_file(v2_path / "config.json")  # 4 heads, 8 experts
    ParallelLayout(2, 2, 2).validate(cfg)
    ParallelLayout(2, 4, 4).validate(cfg)
    cases = [
        (ParallelLayout(2, 1, 1), r"--tp 2: must divide the world size 1; allowed: \[1\].*torchrun"),
        (
            ParallelLayout(2, 6, 6),
            r"--ep 6: the model's n_routed_experts = 8 is not divisible by it; allowed: \[1, 2\]",
        ),
        (ParallelLayout(8, 8, 8), r"--tp 8: the model's num_attention_heads = 4 .*allowed: \[1, 2, 4\]"),
        (ParallelLayout(2, 2, 4), r"--ep 2: .*lcm\(tp, ep\) must equal the world size 4"),
        (ParallelLayout(0, 1, 1), r"--tp 0: must be an integer >= 1"),
    ]
    for layout, pattern in cases:
        with pytest.raises(LayoutError, match=pattern):
            layout.validate(cfg)


def test_serve_rejects_a_bad_layout_with_exit_2(v2_path: Path, monkeypatch, capsys) -> None:
    """In this process: the layout is refused before anything loads (the world size from $WORLD_SIZE)."""
    from runtime.cli import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MOE_SHM_MIN_BYTES", "1")
    assert main(["serve", "--model", str(v2_path), "--tp", "3", "--ep", "1"]) == 2
    assert "--tp 3: the model's num_attention_heads = 4" in capsys.readouterr().err


if __name__ == "__main__" and sys.argv[1] == "--spmd":
    spmd_main(json.loads(sys.argv[2]), [tuple(x) for x in json.loads(sys.argv[3])], sys.argv[4])
