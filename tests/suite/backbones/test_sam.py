"""SAM encoder factory: a checkpoint fixes the shape, so a config beside it is refused."""

from __future__ import annotations

import pytest

from suite.backbones.sam import SamEncoderConfig, sam_image_encoder


def test_checkpoint_and_config_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        sam_image_encoder(tmp_path / "sam_vit_b_01ec64.pth", config=SamEncoderConfig(depth=2))
