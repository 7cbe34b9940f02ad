"""gi_core: pure-PyTorch gradient inversion (Jeon et al., NeurIPS 2021).

No file I/O beyond loading named weights, no orchestration or storage imports, no device
choice, no printing: tensors and a frozen config in, a result dataclass out.
"""

from gi_core.errors import ConfigError, GIError, WeightsMissingError

__all__ = ["ConfigError", "GIError", "WeightsMissingError"]
