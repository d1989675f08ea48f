"""Helper for tests/test_distributed.py: a few HydraLoRA training steps with `accelerate`, in 1 or N processes.

    python tests/dist_train_helper.py OUT [--mode ddp|fsdp]                       # single process, whole batch
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_train_helper.py OUT [--mode ddp|fsdp]

Every step uses the same GLOBAL batch (GLOBAL_BATCH sequences); with P processes, rank p trains on its slice. The
token count per sequence is fixed (no padding), so the mean loss over ranks equals the single-process mean loss and
the trained adapters must match. Writes OUT/result_rank<r>.pt with the adapter weights, the losses, and (rank 0) the
largest difference between the ranks' adapter gradients after the first step (0 when DDP synchronised them).
Top-k routing (k=1) is on: a routed-away head must not trip DDP's unused-parameter check.
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
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    args = parser.parse_args()

    from accelerate import Accelerator
    from peft import get_peft_model

    import peft_hydra
    from conftest import VOCAB, make_tiny_llama

    torch.manual_seed(0)
    config = peft_hydra.HydraLoraConfig(
        r=4, lora_alpha=8, num_experts=3, top_k=1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_weights=False,
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
        loss.backward() if accelerator is None else accelerator.backward(loss)
        if step == 0:
            n_grads = sum(1 for p in model.parameters() if p.requires_grad and p.grad is not None)
            if args.mode == "ddp" and world > 1:
                grads = torch.cat([p.grad.detach().reshape(-1) for _, p in sorted(model.named_parameters())
                                   if p.requires_grad and p.grad is not None])  # fmt: skip
                gathered = [torch.empty_like(grads) for _ in range(world)]
                torch.distributed.all_gather(gathered, grads)
                grad_diff = max(float((gathered[0] - x).abs().max()) for x in gathered)
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))

    if args.mode == "fsdp":
        dtensors = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    else:
        dtensors = 0
        state = accelerator.unwrap_model(model).state_dict()
    hydra = {k: v.detach().cpu().clone() for k, v in state.items() if ".hydra_" in k}
    os.makedirs(args.out, exist_ok=True)
    torch.save(
        {"adapter": hydra, "losses": losses, "grad_diff": grad_diff, "world": world, "n_grads": n_grads,
         "n_trainable": sum(1 for p in model.parameters() if p.requires_grad), "backend": backend, "initial": initial,
         "dtensor_params": dtensors},
        os.path.join(args.out, f"result_rank{rank}.pt"),
    )  # fmt: skip
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
