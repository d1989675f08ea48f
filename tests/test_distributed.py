"""Data-parallel HydraLoRA for real: 2 CPU processes (gloo) launched with torchrun, against a single-process run.

The helper (tests/dist_train_helper.py) trains 3 steps on the same global batch in 1 process and in 2 processes (each
rank on half of it), with top-k routing (k=1): DDP through `accelerate` (find_unused_parameters=False), FSDP2, and
DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 with CPU offload on the shipped config files (DeepSpeed's CPU accelerator).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_train_helper.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, *extra, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, HELPER, str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", HELPER, str(out), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [{**torch.load(os.path.join(out, f"result_rank{r}.pt")), "out": str(out)} for r in range(nproc)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"))[0]


def _assert_same_training(reference, result):
    assert sorted(result["adapter"]) == sorted(reference["adapter"])
    moved = max(float((reference["adapter"][k] - reference["initial"][k]).abs().max()) for k in reference["adapter"])
    assert moved > 1e-2  # the steps did change the adapter, so agreement below is not trivial
    for key, value in reference["adapter"].items():
        torch.testing.assert_close(result["adapter"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)


@pytest.fixture(scope="module")
def single_sequence(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single_sequence"), "--router", "sequence")[0]


@pytest.mark.parametrize("mode, extra", [("fsdp", []), ("deepspeed", ["--accelerate-config", "configs/accelerate_deepspeed_zero3.yaml"])],
                         ids=["fsdp2", "zero3"])
def test_sequence_router_in_two_processes_matches_single_process(single_sequence, tmp_path, mode, extra):
    """The sequence-scope router (a cosine router with its own weight and learned scale, its centre buffer) under
    engines that shard and gather parameters on call: trains as one process does."""
    if mode == "deepspeed":
        pytest.importorskip("deepspeed")
    extra = [os.path.join(ROOT, c) if c.endswith(".yaml") else c for c in extra]
    ranks = _run(tmp_path, "--mode", mode, "--router", "sequence", *extra, nproc=2)
    assert any("hydra_router" in k and k.endswith(".weight") for k in single_sequence["adapter"])
    _assert_same_training(single_sequence, ranks[0])


def test_ddp_two_processes_match_single_process(single, tmp_path):
    ranks = _run(tmp_path, "--mode", "ddp", nproc=2)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    # all adapter parameters (A with the router's rows, B) got a gradient, and DDP made them identical on both ranks
    assert ranks[0]["n_grads"] == ranks[0]["n_trainable"] == 16
    assert ranks[0]["grad_diff"] == 0.0
    for key in ranks[0]["adapter"]:
        torch.testing.assert_close(ranks[1]["adapter"][key], ranks[0]["adapter"][key], rtol=0, atol=0)
    _assert_same_training(single, ranks[0])


def test_fsdp2_two_processes_match_single_process(single, tmp_path):
    ranks = _run(tmp_path, "--mode", "fsdp", nproc=2)
    assert ranks[0]["dtensor_params"] > 0  # the parameters really are sharded
    _assert_same_training(single, ranks[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, config",
    [
        (2, ["--ds-config", "configs/deepspeed_zero2.json"]),
        # the shipped ZeRO-3 setup as `accelerate launch` names it; the persistence threshold is "auto" (10 x hidden):
        # the B heads are partitioned, A and the router (smaller) stay whole
        (3, ["--accelerate-config", "configs/accelerate_deepspeed_zero3.yaml"]),
        # parameters and optimizer state offloaded to CPU, and every parameter partitioned however small
        (3, ["--ds-config", "configs/deepspeed_zero3_offload.json", "--persistence-threshold", "0"]),
    ],
    ids=["zero2", "zero3", "zero3-offload"],
)
def test_deepspeed_two_processes_match_single_process(single, tmp_path, stage, config):
    """DeepSpeed trains HydraLoRA as one process does, and (ZeRO-3) the adapter saved from the run loads without
    DeepSpeed and gives the single-process model's outputs. ZeRO-3 gathers a module's parameters when the module is
    called: the HydraLoRA layer uses every weight by calling its module (hydra_A, with the router's rows, and
    hydra_B)."""
    pytest.importorskip("deepspeed")
    ranks = _run(tmp_path, "--mode", "deepspeed", *[os.path.join(ROOT, c) if c.endswith((".json", ".yaml")) else c for c in config], nproc=2)
    assert ranks[0]["world"] == 2 and ranks[0]["backend"] == "gloo"
    _assert_same_training(single, ranks[0])
    hydra_partitioned = {k.rsplit(".hydra_", 1)[1].split(".")[0] for k in ranks[0]["partitioned"] if ".hydra_" in k}
    if stage == 2:
        assert ranks[0]["partitioned"] == []
        return
    assert "B" in hydra_partitioned, ranks[0]["partitioned"]
    if "--persistence-threshold" in config:
        assert hydra_partitioned == {"A", "B"}  # the router is the last rows of hydra_A

    from peft import PeftModel

    from conftest import make_tiny_llama

    probe = torch.load(os.path.join(single["out"], "probe.pt"))
    loaded = PeftModel.from_pretrained(make_tiny_llama(), os.path.join(tmp_path, "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe["ids"]).logits, probe["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, kind",
    [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP"), ("accelerate_deepspeed_zero3.yaml", "DEEPSPEED")],
)
def test_example_launch_configs_parse(name, kind):
    """The documented `accelerate launch --config_file` files load with accelerate's own parser."""
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "configs", name))
    assert config.distributed_type.name == kind and config.num_processes == 2
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        ds = json.load(open(os.path.join(ROOT, config.deepspeed_config["deepspeed_config_file"])))
        assert ds["zero_optimization"]["stage"] == 3
