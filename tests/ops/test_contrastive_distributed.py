"""The fused distributed contrastive loss on 2 gloo processes (CPU): every rank's share, the gradients after DDP-style
averaging and the logit-scale gradient equal one process holding the whole batch; ranks may scale their losses
differently; the auto choice and the torch backend in float64, the Triton kernels under the interpreter in fp32."""
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from .oracles import oracle

WORLD, B_LOCAL, E = 2, 5, 24


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(loss_fn, img, txt, scale, rank, weight, dtype):
    """This rank's (loss, d_img, d_txt, d_scale) for its rows, with the loss scaled by `weight` before backward."""
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    i, t = (x[rows].to(dtype, copy=True).requires_grad_(True) for x in (img, txt))
    s = scale.to(dtype if dtype == torch.float64 else torch.float32, copy=True).requires_grad_(True)
    loss = loss_fn(i, t, s)
    (weight * loss).backward()
    return loss.detach().double(), i.grad.double(), t.grad.double(), s.grad.double()


def _worker(rank, port, img, txt, scale, queue, done):
    import torch.distributed as dist

    from dinotxt_fast import ops

    from .distributed_oracle import contrastive_loss_distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    try:
        results = {}
        for name, backend, dtype, normalize in (("auto", None, torch.float64, True),
                                                ("torch", "torch", torch.float64, True),
                                                ("torch_raw", "torch", torch.float64, False),
                                                ("triton", "triton", torch.float32, True)):
            def fused(i, t, s, normalize=normalize, backend=backend):
                return ops.contrastive_loss(i, t, s, normalize=normalize, group=group, backend=backend)

            loss, d_img, d_txt, d_scale = _step(fused, img, txt, scale, rank, 1.0, dtype)
            dist.all_reduce(d_scale)  # DDP averages parameter gradients over ranks
            results[name] = (loss, d_img, d_txt, d_scale / WORLD)
        # Ranks scaling their losses differently (weights 1 and 2.5): the fused path must give every rank exactly the
        # gradients of the autograd composite (an all-gather whose backward sums every rank's terms).
        weight = 1.0 + 1.5 * rank
        fused_torch = lambda i, t, s: ops.contrastive_loss(i, t, s, group=group, backend="torch")  # noqa: E731
        composite = lambda i, t, s: contrastive_loss_distributed(i, t, s, True, group)  # noqa: E731
        got = list(_step(fused_torch, img, txt, scale, rank, weight, torch.float64))
        want = list(_step(composite, img, txt, scale, rank, weight, torch.float64))
        for pair in (got, want):  # compare the DDP-averaged scale gradient: per rank it is split differently
            dist.all_reduce(pair[3])
        results["weighted"] = (got, want)
        queue.put((rank, results))
        done.wait(120)  # the parent fetches the shared tensors from this process: stay alive until it has them
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    g = torch.Generator().manual_seed(7)
    img = torch.randn(WORLD * B_LOCAL, E, dtype=torch.float64, generator=g)
    txt = 0.5 * img + torch.randn(WORLD * B_LOCAL, E, dtype=torch.float64, generator=g)
    scale = torch.tensor(2.2, dtype=torch.float64)
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, img, txt, scale, queue, done)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=300) for _ in range(WORLD))
        failed = [tb for tb in results.values() if isinstance(tb, str)]
        assert not failed, "a worker failed:\n" + failed[0]
    finally:
        done.set()
        for p in procs:
            p.join(timeout=60)
    return img, txt, scale, results


def _single_process(img, txt, scale, normalize):
    i, t, s = (x.clone().requires_grad_(True) for x in (img, txt, scale))
    loss = oracle(i, t, s, normalize)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad


@pytest.mark.parametrize("name,normalize,rtol", [("auto", True, 1e-10), ("torch", True, 1e-10),
                                                 ("torch_raw", False, 1e-10), ("triton", True, 1e-5)])
def test_distributed_equals_single_process(runs, name, normalize, rtol):
    img, txt, scale, results = runs
    loss, d_img, d_txt, d_scale = _single_process(img, txt, scale, normalize)
    shares = [results[r][name] for r in range(WORLD)]
    # the mean of the ranks' shares is the global loss
    assert abs(sum(s[0].item() for s in shares) / WORLD - loss.item()) <= rtol * abs(loss.item())
    # DDP: each rank's loss is averaged over ranks, so its input gradients are WORLD x the global-loss gradient
    for got, want in ((torch.cat([s[1] for s in shares]) / WORLD, d_img),
                      (torch.cat([s[2] for s in shares]) / WORLD, d_txt)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    for s in shares:
        torch.testing.assert_close(s[3], d_scale, rtol=rtol, atol=rtol * 1e-3)


def test_distributed_ranks_with_different_loss_weights_match_the_autograd_composite(runs):
    _, _, _, results = runs
    for rank in range(WORLD):
        got, want = results[rank]["weighted"]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
