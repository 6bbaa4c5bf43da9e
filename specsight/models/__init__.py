"""Models: what specsight runs on.

Torch-free, for the compiler and the site tables: :class:`ModelInfo` (a model's shape and
module tree as plain data) and the tokenizers (:class:`Tokenizer`, :class:`LabelTokenizer` for
models without text inputs).

The names specsight knows and which models are here (:mod:`.catalog`, torch-free too).
Loading (torch) lives in :mod:`specsight.models.load`: ``load_model`` (built-in, tiny-<family>,
folders and the local hub cache), ``load_model_ref`` (a spec's ``model:``, factories included),
``load_model_info`` (shapes without weights).
"""

from .info import ModelInfo
from .tokenizer import LabelTokenizer, Tokenizer

__all__ = ["ModelInfo", "Tokenizer", "LabelTokenizer"]
