"""Single-device GPT-NeoX family model (see model.py) and its Hugging Face mapping (hf.py)."""
from neox.model.cache import CacheFullError, KVCache
from neox.model.model import GPTNeoX, causal_lm_loss

__all__ = ["GPTNeoX", "KVCache", "CacheFullError", "causal_lm_loss"]
