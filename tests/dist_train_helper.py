"""Helper for tests/test_distributed.py: a few HydraLoRA training steps with `accelerate`, in 1 or N processes.

    python tests/dist_train_helper.py OUT [--mode ddp|fsdp]                       # single process, whole batch
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_train_helper.py OUT [--mode ddp|fsdp]
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_train_helper.py OUT --mode deepspeed \
        (--accelerate-config configs/accelerate_deepspeed_zero3.yaml | --ds-config configs/deepspeed_zero2.json)

Every step uses the same GLOBAL batch (GLOBAL_BATCH sequences); with P processes, rank p trains on its slice. The
token count per sequence is fixed (no padding), so the mean loss over ranks equals the single-process mean loss and
the trained adapters must match. Writes OUT/result_rank<r>.pt with the adapter weights, the losses, and (rank 0) the
largest difference between the ranks' adapter gradients after the first step (0 when DDP synchronised them).
Top-k routing (k=1) is on: a routed-away head must not trip DDP's unused-parameter check.

``--mode deepspeed`` trains with ``deepspeed.initialize`` on a shipped DeepSpeed JSON (given directly or named by the
accelerate config file), its "auto" entries filled as Trainer/accelerate fill them (DeepSpeed's CPU accelerator, gloo).
Not through ``Accelerator``: accelerate 1.15 on a machine without GPUs initialises DeepSpeed's process group but counts
one process (every rank would train on the whole batch). ``--persistence-threshold 0`` partitions every parameter under
ZeRO-3, however small. Rank 0 saves the adapter as Trainer does under ZeRO-3 (``save_pretrained`` with the state dict
that ``_zero3_consolidated_16bit_state_dict`` gathers, what ``accelerator.get_state_dict`` calls) into OUT/adapter. The single-process run writes the logits of its trained model on a probe batch (OUT/probe.pt).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GLOBAL_BATCH = 4
SEQ_LEN = 12
STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["ddp", "fsdp", "deepspeed"], default="ddp")
    parser.add_argument("--accelerate-config", help="an `accelerate launch` config file with a DeepSpeed section")
    parser.add_argument("--ds-config", help="a DeepSpeed JSON config file")
    parser.add_argument("--persistence-threshold", type=int, help="ZeRO-3 stage3_param_persistence_threshold")
    parser.add_argument("--router", choices=["token", "sequence"], default="token",
                        help="sequence: a centred cosine sequence-scope router (its own weight, log-scale and centre)")
    args = parser.parse_args()

    from accelerate import Accelerator
    from peft import get_peft_model

    import peft_hydra
    from conftest import VOCAB, make_tiny_llama

    torch.manual_seed(0)
    sequence = {"router_scope": "sequence", "router_cosine": True, "router_center": True, "router_pool_tokens": 4}
    config = peft_hydra.HydraLoraConfig(
        r=4, lora_alpha=8, num_experts=3, top_k=1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_weights=False, **(sequence if args.router == "sequence" else {}),
    )  # fmt: skip
    model = get_peft_model(make_tiny_llama(), config)
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if ".hydra_" in k}

    def make_optimizer(m):
        # SGD: the update is linear in the gradient, so float reduction-order noise stays tiny (Adam amplifies it)
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)

    if args.mode == "fsdp":
        # accelerate has no FSDP on CPU (MULTI_CPU only does DDP), so use torch's FSDP2 directly, as accelerate
        # would on GPUs: shard every decoder layer, then the root.
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = make_optimizer(model)
        accelerator, backend = None, dist.get_backend()
    elif args.mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model), config=_deepspeed_config(args, model, world)
        )
        model, accelerator, backend = engine, None, torch.distributed.get_backend()
    else:
        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        optimizer = make_optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        backend = str(accelerator.state.backend)
    if GLOBAL_BATCH % world:
        raise SystemExit(f"GLOBAL_BATCH={GLOBAL_BATCH} must be divisible by the {world} processes")

    g = torch.Generator().manual_seed(123)
    data = torch.randint(3, VOCAB, (STEPS, GLOBAL_BATCH, SEQ_LEN), generator=g)
    per_rank = GLOBAL_BATCH // world
    losses, grad_diff = [], None
    for step in range(STEPS):
        batch = data[step, rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        if args.mode == "deepspeed":
            model.backward(loss)  # the engine all-reduces / reduce-scatters, and steps in model.step()
        else:
            loss.backward() if accelerator is None else accelerator.backward(loss)
        if step == 0:
            n_grads = sum(1 for p in model.parameters() if p.requires_grad and p.grad is not None)
            if args.mode == "ddp" and world > 1:
                grads = torch.cat([p.grad.detach().reshape(-1) for _, p in sorted(model.named_parameters())
                                   if p.requires_grad and p.grad is not None])  # fmt: skip
                gathered = [torch.empty_like(grads) for _ in range(world)]
                torch.distributed.all_gather(gathered, grads)
                grad_diff = max(float((gathered[0] - x).abs().max()) for x in gathered)
        if args.mode == "deepspeed":
            model.step()
        else:
            optimizer.step()
            optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))

    partitioned = []
    if args.mode == "fsdp":
        dtensors = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    elif args.mode == "deepspeed":
        dtensors = 0
        # ZeRO-3: the parameters that are partitioned (not kept whole for being under the persistence threshold)
        partitioned = [n for n, p in model.module.named_parameters() if hasattr(p, "ds_id") and not p.ds_persist]
        if model.zero_optimization_partition_weights():  # gathered on rank 0, as Trainer.save_model does
            state = model._zero3_consolidated_16bit_state_dict()
        else:
            state = model.module.state_dict()
        if rank == 0:
            model.module.save_pretrained(os.path.join(args.out, "adapter"), state_dict=state)
        state = state or {}
    else:
        dtensors = 0
        state = accelerator.unwrap_model(model).state_dict()
    hydra = {k: v.detach().cpu().clone() for k, v in state.items() if ".hydra_" in k}
    os.makedirs(args.out, exist_ok=True)
    if world == 1 and args.mode != "deepspeed":
        probe = torch.randint(3, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            torch.save({"ids": probe, "logits": model.eval()(input_ids=probe).logits}, os.path.join(args.out, "probe.pt"))
    torch.save(
        {"adapter": hydra, "losses": losses, "grad_diff": grad_diff, "world": world, "n_grads": n_grads,
         "n_trainable": sum(1 for p in model.parameters() if p.requires_grad), "backend": backend, "initial": initial,
         "dtensor_params": dtensors, "partitioned": partitioned},
        os.path.join(args.out, f"result_rank{rank}.pt"),
    )  # fmt: skip
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _deepspeed_config(args, model, world):
    """The shipped DeepSpeed JSON (given directly, or named by an accelerate config file) with its "auto" entries filled
    as transformers.Trainer / accelerate fill them (hidden-size based bucket sizes and persistence threshold, no mixed
    precision here); gradient clipping off, as in the reference run."""
    import json

    ds_file = args.ds_config
    if args.accelerate_config:
        from accelerate.commands.config.config_args import load_config_from_file

        ds_file = load_config_from_file(args.accelerate_config).deepspeed_config["deepspeed_config_file"]
    with open(ds_file) as f:
        ds = json.load(f)
    hidden = model.config.hidden_size
    fill = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "stage3_param_persistence_threshold": 10 * hidden,
    }  # fmt: skip
    for section in (ds, ds["zero_optimization"]):
        for key, value in section.items():
            if value == "auto" and key in fill:
                section[key] = fill[key]
    for precision in ("bf16", "fp16"):
        ds[precision]["enabled"] = False
    ds["zero_allow_untested_optimizer"] = True  # a torch optimizer (SGD): accelerate sets this for one too
    if args.persistence_threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    if ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # SGD as the reference run (Trainer would use DeepSpeed's CPU Adam)
    leftover = [k for sec in (ds, ds["zero_optimization"]) for k, v in sec.items() if v == "auto"]
    if leftover:
        raise SystemExit(f"'auto' entries left unfilled in {ds_file}: {leftover}")
    return ds


if __name__ == "__main__":
    main()
