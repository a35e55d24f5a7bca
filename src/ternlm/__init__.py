"""ternlm: ternary (1.58-bit) language models on ordinary CPUs.

    import ternlm
    m = ternlm.load("path/to/model")          # an HF directory; no argument: the shipped default model
    print(m.generate("To be, or not to be"))
"""

from .api import LanguageModel, load
from .config import BitNetConfig
from .errors import FormatError
from .generate import ContextOverflowError, GenerationStats

__version__ = "0.1.0"
__all__ = ["load", "LanguageModel", "BitNetConfig", "FormatError", "ContextOverflowError", "GenerationStats"]
