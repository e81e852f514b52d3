"""The trainer's multi-process side (torchrun): the process group, DDP or FSDP2 around the trainable module, full
state dicts for checkpoints, and the few collectives of a step. With one process every function here is a
plain local operation."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.world > 1 else None


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (multi-node too); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is available")
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
        dev = torch.device("cuda", d.local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return d, dev


def wrap_trainable(lit: nn.Module, text: nn.Module, d: Dist, device: torch.device,
                   fsdp: bool) -> tuple[nn.Module, list[nn.Parameter]]:
    """(the module to call for the forward, the parameters whose gradients `average_gradients` must average).

    One process: `lit` itself. Several: DDP around it, or with `fsdp` FSDP2 shards the text tower `text` (its
    blocks, then the rest of it) while the small head and the logit scale stay replicated, their gradients
    averaged by hand after each backward (DDP can't wrap a module that holds FSDP-sharded submodules, and FSDP2
    can't shard the 0-d logit scale)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in text.backbone.blocks:
            fully_shard(block)
        fully_shard(text)
        return lit, [p for name, p in lit.named_parameters() if p.requires_grad and not name.startswith("text.")]
    if d.world > 1:
        return nn.parallel.DistributedDataParallel(lit, device_ids=[device.index] if device.type == "cuda"
                                                   else None), []
    return lit, []


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of `params` over the ranks in one collective (the FSDP mode's replicated part)."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(new)


def agree_on_step(loss: torch.Tensor, stop_here: bool, d: Dist) -> tuple[float, bool]:
    """(mean loss over the ranks, whether any rank asked to stop), in one small all-reduce, so that all ranks stop
    (for a non-finite loss or SIGTERM) at the same step and no collective is left waiting."""
    status = torch.stack([loss.detach().float(), torch.tensor(float(stop_here), device=loss.device)])
    if d.world > 1:
        dist.all_reduce(status)
        status[0] /= d.world
    return status[0].item(), bool(status[1].item())


def gather_objects(obj, d: Dist):
    """Every rank's `obj`, in rank order, on every rank; `obj` itself with one process."""
    if d.world == 1:
        return obj
    gathered = [None] * d.world
    dist.all_gather_object(gathered, obj)
    return gathered


def full_state(lit: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state; with FSDP a collective that every rank must enter."""
    if not fsdp:
        return lit.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(lit, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state(lit: nn.Module, fsdp: bool) -> dict:
    """Full (unsharded) model state, without the optimizer's; with FSDP a collective whose result only rank 0 holds."""
    if not fsdp:
        return lit.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(lit, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(lit: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        lit.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(lit, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
