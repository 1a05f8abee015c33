"""Regenerate ``adm_reference.json``: outputs of OpenAI's own code for fixed weights and inputs.

The ADM tests compare the project's ADM UNet and noisy classifier with these numbers, so they check against
the original implementation without shipping it. Run with checkouts of openai/guided-diffusion and
openai/improved-diffusion (not needed for the tests):

    python tests/data/make_adm_reference.py /path/to/guided-diffusion /path/to/improved-diffusion
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_adm import REFERENCE_FILE, reference_cases  # noqa: E402


def main(guided: str, improved: str) -> None:
    sys.path.insert(0, guided)
    from guided_diffusion.unet import EncoderUNetModel, UNetModel

    sys.path.insert(0, improved)
    from improved_diffusion.unet import UNetModel as ImprovedUNetModel

    out = {}
    for case in reference_cases():
        cfg, kind = case["config"], case["kind"]
        att = tuple(cfg.image_size // r for r in cfg.attention_resolutions)
        common = dict(in_channels=cfg.in_channels, model_channels=cfg.num_channels, num_res_blocks=cfg.num_res_blocks,
                      attention_resolutions=att, dropout=0.0, channel_mult=cfg.resolved_channel_mult(),
                      num_heads=cfg.num_heads, use_scale_shift_norm=cfg.use_scale_shift_norm)
        if kind == "classifier":
            net = EncoderUNetModel(image_size=cfg.image_size, out_channels=cfg.num_classes,
                                   num_head_channels=cfg.num_head_channels, resblock_updown=cfg.resblock_updown,
                                   pool=case["pool"], **common)
        elif kind == "improved":
            net = ImprovedUNetModel(out_channels=cfg.out_channels, **common)
        else:
            net = UNetModel(image_size=cfg.image_size, out_channels=cfg.out_channels,
                            num_classes=cfg.num_classes if cfg.class_cond else None,
                            num_head_channels=cfg.num_head_channels, num_heads_upsample=cfg.num_heads_upsample,
                            resblock_updown=cfg.resblock_updown, use_new_attention_order=cfg.use_new_attention_order,
                            **common)
        net.load_state_dict(case["state"])
        net.eval()
        with torch.no_grad():
            t = case["t"].float() * case["time_scale"]  # improved-diffusion's wrapper rescales t before the net
            args = (case["x"], t) if case["y"] is None else (case["x"], t, case["y"])
            y = net(*args).double()
        out[case["name"]] = {"shape": list(y.shape), "head": y.flatten()[:16].tolist(),
                             "sum": y.sum().item(), "abs_sum": y.abs().sum().item()}
        print(case["name"], out[case["name"]]["abs_sum"])
    REFERENCE_FILE.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
