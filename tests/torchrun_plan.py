"""Run by ``tests/test_train_ddp.py`` under ``torchrun``: several ``diffaug`` CLI commands in one launch (one
process group and one start-up instead of one per command), then, if asked, a two-rank gradient check.

``python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_plan.py PLAN.json`` where the plan is
``{"commands": [[argv...], ...], "grad_check": "FILE.safetensors", "sync_check": {"out": DIR, "denoiser": DIR,
"result": FILE.json}}`` (both checks optional); exits with the first failing command's code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def grad_check(path: Path) -> None:
    """Rank 0 writes three gradients of the diffusion loss of one global batch of 8 (the same t, noise and labels on
    every rank): through DDP with each rank on its share (``ddp.``), of the whole batch on one model (``full.``),
    and of rank 0's share alone (``local.``)."""
    from safetensors.torch import save_file

    from diffaug.denoiser import Denoiser
    from diffaug.train.diffusion import DiffusionTrainConfig, build_diffusion_model, diffusion_loss
    from diffaug.utils.distributed import data_parallel, init_distributed, rank_share

    device = torch.device("cpu")
    dist_info = init_distributed(device)
    cfg = DiffusionTrainConfig(width=8, seed=3)

    def fresh():  # the same initial weights every time (seeded build)
        unet, scheduler = build_diffusion_model(cfg, 8, 1, 10)
        return unet, Denoiser.from_diffusers(unet, scheduler, num_classes=10, null_class=10)

    g = torch.Generator().manual_seed(1)
    n = 8
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 11, (n,), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(n, 1, 8, 8, generator=g)
    share = rank_share(torch.arange(n), dist_info)

    grads = {}
    unet, den = fresh()
    trained = den.with_net(data_parallel(den.net, device))  # kept alive through backward, as the loop's is
    diffusion_loss(trained, x0[share], t[share], noise[share], y[share]).backward()
    grads["ddp"] = unet
    for name, idx in (("full", torch.arange(n)), ("local", share)):
        unet, den = fresh()
        diffusion_loss(den, x0[idx], t[idx], noise[idx], y[idx]).backward()
        grads[name] = unet
    if dist_info.main:
        save_file({f"{name}.{k}": p.grad.detach().clone().contiguous()
                   for name, m in grads.items() for k, p in m.named_parameters()}, str(path))


def sync_check(out: str, denoiser: str, result: Path) -> None:
    """A semi-supervised guidance run (two forwards of the network per step) on both ranks; rank 0 writes whether
    the ranks' trained weights are equal (each rank drew other noise: they are only if the gradients were
    all-reduced) and the number of ranks."""
    from diffaug.train.guidance import GuidanceTrainConfig, train_guidance
    from diffaug.utils.distributed import gather_objects, init_distributed

    dist_info = init_distributed(torch.device("cpu"))
    cfg = GuidanceTrainConfig(kind="noisy", denoiser=denoiser, steps=2, batch_size=8, width=8, labelled_fraction=0.5,
                              consistency_weight=1.0)
    model = train_guidance(cfg, out, progress=False)
    weights = gather_objects(torch.cat([p.detach().flatten() for p in model.net.parameters()]), dist_info)
    if dist_info.main:
        result.write_text(json.dumps({"world": len(weights), "equal": all(torch.equal(w, weights[0]) for w in weights)}))


def main() -> int:
    from diffaug.cli import main as cli

    plan = json.loads(Path(sys.argv[1]).read_text())
    for argv in plan["commands"]:
        rc = cli(argv)
        if rc:
            return rc
        if torch.distributed.is_initialized():  # rank 0 may still be writing the final outputs another rank reads next
            torch.distributed.barrier()
    if plan.get("grad_check"):
        grad_check(Path(plan["grad_check"]))
    if plan.get("sync_check"):
        check = plan["sync_check"]
        sync_check(check["out"], check["denoiser"], Path(check["result"]))
    return 0


if __name__ == "__main__":
    from diffaug.utils.distributed import exit_process

    exit_process(main())
