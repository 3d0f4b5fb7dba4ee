"""The DCASE 2024 Task 1 baseline (simplified CP-Mobile) against its published complexity table.

Published (CPJKU/dcase2024_task1_baseline README, counted with torchinfo via NeSsi on a
1 x 1 x 256 x 65 input): 61,148 parameters and 29,419,156 MACs. torchinfo counts every trainable
parameter (BatchNorm scale and shift included, 2C per norm) and adds 2C "MACs" per BatchNorm.
``asc.complexity`` counts conv MACs only and folds each BatchNorm into the conv before it
(C biases instead of 2C affine values). The default model normalises 1,354 channels in all, so:

* PyTorch count (``trained_params``): 61,148, equal to the published number;
* deployed count after folding (``params``): 61,148 - 1,354 = 59,794 (2.2 % below);
* MACs: 29,419,156 - 2 * 1,354 = 29,416,448 (0.009 % below).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asc.complexity import complexity
from asc.errors import ConfigError
from asc.models import CPMobile, CPMobileBlock, build_model, make_divisible, model_names
from asc.models.cpmobile import PUBLISHED_MACS, PUBLISHED_PARAMS

ONE_SECOND = (1, 1, 256, 65)  # 32 kHz, hop 500, 256 mels


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def normalised_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_channel_rounding_gives_the_published_widths() -> None:
    assert [make_divisible(v) for v in (32, 32 * 1.8, 32 * 1.8**2, 32 * 2.1, 56 * 2.1)] == [32, 56, 104, 64, 120]
    assert make_divisible(3) == 8 and make_divisible(10) == 16  # never below 8, never > 10 % down


def test_parameter_count_matches_the_published_table() -> None:
    model = CPMobile()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS == 61_148
    assert normalised_channels(model) == 1_354


def test_complexity_against_published_numbers() -> None:
    model = CPMobile()
    c = complexity(model, ONE_SECOND, one_second_shape=ONE_SECOND)
    bn = normalised_channels(model)
    # the organisers' count is the PyTorch count
    assert c.trained_params == PUBLISHED_PARAMS
    # deployed: each BatchNorm folded into its bias-free conv, 2C affine values -> C biases
    assert c.params == PUBLISHED_PARAMS - bn == 59_794
    assert c.keras_params == PUBLISHED_PARAMS + 2 * bn  # plus running mean and variance
    # MACs: convs only here; torchinfo adds 2C per BatchNorm
    assert c.macs == c.macs_1s == PUBLISHED_MACS - 2 * bn == 29_416_448
    assert abs(c.macs - PUBLISHED_MACS) / PUBLISHED_MACS < 0.01
    assert abs(c.trained_params - PUBLISHED_PARAMS) / PUBLISHED_PARAMS < 0.01
    assert c.bytes == 59_794 * 4 and c.macs_1s <= 30_000_000


def test_per_layer_rows_match_the_published_table() -> None:
    """README rows are conv + BatchNorm: params = conv weights + 2C, MACs = conv MACs + 2C."""
    model = CPMobile()
    layers = {layer.name: layer for layer in complexity(model, ONE_SECOND).layers}
    published = {  # README row: (params, MACs); blocks b1..b6 are stages.s.i here
        "stem.0": (88, 304_144),
        "stem.1": (2_368, 2_506_816),
        **{f"stages.0.{i}.{part}": row for i in (0, 1) for part, row in
           (("expand", (2_176, 2_228_352)), ("depthwise", (704, 626_816)), ("project", (2_112, 2_228_288)))},
        "stages.0.2.expand": (2_176, 2_228_352),
        "stages.0.2.depthwise": (704, 331_904),  # block 3 strides time
        "stages.0.2.project": (2_112, 1_179_712),
        "stages.1.0.expand": (2_176, 1_179_776),
        "stages.1.0.depthwise": (704, 166_016),  # block 4 strides frequency
        "stages.1.0.project": (3_696, 1_032_304),
        "stages.1.1.expand": (6_960, 1_935_600),
        "stages.1.1.depthwise": (1_320, 311_280),
        "stages.1.1.project": (6_832, 1_935_472),
        "stages.2.0.expand": (6_960, 1_935_600),
        "stages.2.0.depthwise": (1_320, 311_280),
        "stages.2.0.project": (12_688, 3_594_448),
        "classifier": (1_060, 299_540),  # README: conv 1,040 / 299,520 and BN 20 / 20
    }
    assert len(published) == 21
    assert sum(p for p, _ in published.values()) == PUBLISHED_PARAMS
    assert sum(m for _, m in published.values()) == PUBLISHED_MACS
    for row, (params, macs) in published.items():
        conv, norm = layers[f"{row}.0"], layers[f"{row}.1"]
        assert conv.trained_params + norm.trained_params == params, row
        assert conv.macs + norm.trained_params == macs, row  # torchinfo: 2C MACs per BatchNorm
        assert norm.params == 0 and "folded" in norm.note, row


def test_forward_shapes_and_strides() -> None:
    model = CPMobile().eval()
    taps = model.feature_taps()
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
             for name, m in taps.items()]
    with torch.no_grad():
        assert model(torch.randn(*ONE_SECOND)).shape == (1, 10)
        assert model(torch.randn(3, 1, 256, 651)).shape == (3, 10)  # a 10-s clip
    for hook in hooks:
        hook.remove()
    assert shapes["stem"] == (3, 32, 64, 163)
    assert shapes["stage1"] == (3, 32, 64, 82)  # block 3 strides time
    assert shapes["stage2"] == (3, 56, 32, 82)  # block 4 strides frequency
    assert shapes["stage3"] == (3, 104, 32, 82)


def test_block_shortcuts() -> None:
    assert isinstance(CPMobileBlock(32, 32, expansion_rate=2.1).shortcut, nn.Identity)
    assert isinstance(CPMobileBlock(32, 32, expansion_rate=2.1, stride=(1, 2)).shortcut, nn.AvgPool2d)
    assert CPMobileBlock(32, 56, expansion_rate=2.1, stride=(2, 1)).shortcut is None
    # zero convs: a kept-width block passes ReLU(x), a widening one gives zeros
    block = CPMobileBlock(8, 8, expansion_rate=2).eval()
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
    x = torch.randn(1, 8, 6, 5)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))


def test_trains_one_step_on_a_tiny_batch() -> None:
    model = CPMobile(num_classes=4).train()
    x, y = torch.randn(8, 1, 64, 33), torch.arange(8) % 4
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(2):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        optimiser.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        losses.append(nn.functional.cross_entropy(model(x), y).item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_export_without_data_dependent_control_flow() -> None:
    model = CPMobile().eval()
    exported = torch.export.export(model, (torch.randn(*ONE_SECOND),))
    other = torch.randn(*ONE_SECOND)
    torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-4, atol=1e-5)


def test_registry_and_options() -> None:
    assert "dcase2024_baseline" in model_names()
    model = build_model("dcase2024_baseline", 10)
    assert isinstance(model, CPMobile)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS
    small = build_model("dcase2024_baseline", 3, base_channels=16, n_blocks=[1, 1], strides={2: [2, 2]})
    assert small.classifier[0].out_channels == 3 and len(small.stages) == 2
    with torch.no_grad():
        assert small.eval()(torch.randn(1, 1, 64, 33)).shape == (1, 3)
    with pytest.raises(ConfigError, match="stride for block 7"):
        CPMobile(strides={7: (2, 1)})
    with pytest.raises(ConfigError, match="n_blocks"):
        CPMobile(n_blocks=())
    with pytest.raises(ConfigError, match="unknown channel norm"):
        CPMobile(norm="layernorm")
    with pytest.raises(ConfigError, match="no option 'width'"):
        build_model("dcase2024_baseline", 10, width=2)
