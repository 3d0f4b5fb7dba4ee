"""torchao's PT2E quantization API, imported without its console noise.

torchao's CPU wheel tries to load CUDA-only kernels and logs a warning per file on import, and
registering its enums logs a torch deprecation notice; neither affects PT2E. Copying an exported
graph (every ``copy.deepcopy`` of a QAT model: checkpoints, conversion, pruning masks) rebuilds
its tree specs through the deprecated ``LeafSpec`` constructor, which warns from inside
``copyreg`` with a message about torch's own code; that one warning is filtered. Both the QAT method
(which builds int8 graphs) and checkpoint loading (which reads them back) import it through here.
"""

from __future__ import annotations

import logging
import warnings

for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        category=FutureWarning, module="copyreg")

from torchao.quantization.pt2e import (  # noqa: E402
    FakeQuantize,
    FakeQuantizeBase,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    allow_exported_model_train_eval,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import (  # noqa: E402
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)

__all__ = [
    "FakeQuantize",
    "FakeQuantizeBase",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "QuantizationAnnotation",
    "QuantizationSpec",
    "Quantizer",
    "allow_exported_model_train_eval",
    "convert_pt2e",
    "prepare_qat_pt2e",
]
