"""Every domain YAML, through the same checks: a domain added under domains/ adds a row.

Each domain ships ``domains/<name>/tiny.yaml``, its smallest settings (composed after the domain
YAML), so cross-domain checks stay cheap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from suite.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = sorted(p.stem for p in (ROOT / "domains").glob("*.yaml"))


def _tiny(domain: str) -> list[str]:
    tiny = ROOT / "domains" / domain / "tiny.yaml"
    assert tiny.is_file(), f"domains/{domain}.yaml has no domains/{domain}/tiny.yaml (its smallest settings for these tests)"
    return ["--config", str(ROOT / "domains" / f"{domain}.yaml"), "--config", str(tiny)]


def _final_loss(domain: str, root: Path, seed: int, precision: str, steps: int = 5) -> float:
    # the seeds every domain has: the global RNG, the seeded (random frozen and new) weights, the data's order
    cli = main(["fit", *_tiny(domain), "--seed_everything", str(seed), "--model.init_args.backbone_seed", str(seed),
                "--data.init_args.seed", str(seed),
                "--trainer.precision", precision,
                "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root / f"{precision}-{seed}")])
    return float(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("domain", DOMAINS)
def test_bf16_training_stays_within_the_fp32_seed_spread(domain: str, tmp_path: Path) -> None:
    """A short fixed-seed run in bf16 ends within the seed-to-seed spread of fp32 runs (the bf16
    rounding changes the loss less than another seed does)."""
    fp32 = [_final_loss(domain, tmp_path, seed, "32-true") for seed in (0, 1)]
    bf16 = _final_loss(domain, tmp_path, 0, "bf16-mixed")
    spread = max(fp32) - min(fp32)
    assert abs(bf16 - fp32[0]) <= spread, f"{domain}: bf16 {bf16:.4f} vs fp32 {fp32} (spread {spread:.4f})"
