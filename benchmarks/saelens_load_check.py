"""Check that sae-lens loads our SAE directories and computes what we compute.

sae-lens pins ``transformer-lens<4``, so it cannot share our environment; run the two halves in
two venvs (not part of CI):

    # 1. in this project's venv: write a TopK and a BatchTopK SAE plus inputs and our outputs
    python benchmarks/saelens_load_check.py write /tmp/saelens_check
    # 2. in a separate venv:
    #    python -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 sae-lens
    /tmp/saelens-venv/bin/python benchmarks/saelens_load_check.py check /tmp/saelens_check

``check`` loads each directory with ``sae_lens.SAE.load_from_disk`` and compares ``encode`` and
``decode(encode(x))`` with the outputs our ``TopKSAE`` wrote; it exits 1 on any mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write(root: Path) -> None:
    """Save two random SAEs (TopK, BatchTopK) with our code, plus raw inputs and our outputs."""
    from saes.model import TopKSAE

    torch.manual_seed(0)
    x = 4.0 * torch.randn(64, 48) + 1.0
    for name, threshold in (("topk", None), ("batch_topk", 0.8)):
        sae = TopKSAE(48, 256, 8, hook_name="blocks.3.hook_resid_post", model="tiny-random", threshold=threshold, activation_scale=0.5)
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_()
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.save(root / name)
        with torch.no_grad():
            save_file({"x": x, "features": sae.encode(x), "recon": sae(x)}, str(root / name / "expected.safetensors"))
    print(f"wrote {root}/topk and {root}/batch_topk")


def check(root: Path) -> int:
    """Load every directory under ``root`` with sae-lens and compare with the expected outputs."""
    from sae_lens import SAE

    failures = 0
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        expected = load_file(str(directory / "expected.safetensors"))
        sae = SAE.load_from_disk(str(directory), device="cpu")
        with torch.no_grad():
            features = sae.encode(expected["x"])
            recon = sae.decode(features)
        ok_f = torch.allclose(features, expected["features"], atol=1e-4)
        ok_r = torch.allclose(recon, expected["recon"], atol=1e-4)
        print(f"{directory.name}: sae-lens class {type(sae).__name__}, hook {sae.cfg.metadata.hook_name}, "
              f"features {'match' if ok_f else 'DIFFER'}, reconstruction {'matches' if ok_r else 'DIFFERS'}")
        failures += not (ok_f and ok_r)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit("usage: saelens_load_check.py write|check DIR")
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        sys.exit(check(Path(sys.argv[2])))
